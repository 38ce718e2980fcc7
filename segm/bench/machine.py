"""What the benchmark ran on: processor, library versions, thread count, load average."""
from __future__ import annotations

import os
import platform

import torch


def _cpuinfo() -> dict:
    """model name, vendor_id, cpu family and model of the first processor in /proc/cpuinfo."""
    keys = {"model name": "cpu", "vendor_id": "cpu_vendor", "cpu family": "cpu_family", "model": "cpu_model"}
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and keys[key] not in found:
                    found[keys[key]] = value.strip()
                if not line.strip() and found:
                    break
    except OSError:
        pass
    return found


def machine_info(device) -> dict:
    import timm

    info = {
        "cpu": platform.processor() or platform.machine(), "cpu_vendor": None, "cpu_family": None, "cpu_model": None,
        **_cpuinfo(),
        # the widest vector ISA torch's CPU kernels dispatch to (AVX2, AVX512, ...); oneDNN picks its own
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "gpu": None,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None
