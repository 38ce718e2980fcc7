"""The GPU check (`make gpu-check OUT=dir`, scripts/gpu_check.py) and the wheels it installs on a
bare GPU machine (`make gpu-wheels`, gpu/requirements.txt). Standard library only at import time:
the check starts on a machine where nothing of this project is installed."""
