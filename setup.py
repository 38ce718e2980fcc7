from setuptools import find_packages, setup

setup(
    name="segm",
    version="0.1.0",
    description="Segmenter with Content-aware Token Sharing (CTS): exact, fast, tested",
    python_requires=">=3.10",
    packages=find_packages(include=["segm", "segm.*", "policynet", "policynet.*"])
    + ["segm.configs"],
    # configs/ lives at the repository root; it is installed as the package segm.configs
    package_dir={"segm.configs": "configs"},
    package_data={"segm.configs": ["*.yml"], "segm.data": ["classes/*.yml"]},
    install_requires=[
        # the oldest torch tested (requirements.txt); the ONNX export (torch.export, then
        # torch.onnx.export of the ExportedProgram) changed across 2.x releases before it
        "torch>=2.14",
        "torchvision>=0.19",
        "timm>=1.0,<2",
        "mmcv>=1.7,<1.8",
        "mmsegmentation>=0.30,<0.31",
        "numpy>=1.26",
        "pyyaml>=6",
        "click>=8",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tensorboard>=2.10",
        "matplotlib>=3.7",
        "prettytable>=3",
        "opencv-python-headless>=4.8",
        "pillow>=9",
        "yapf<=0.40.1",
        "onnx>=1.18,<2",
        "onnxscript>=0.5,<1",
        "onnxruntime>=1.22,<2",
    ],
)
