"""What the benchmark ran on: processor, library versions, thread count, load average."""
from __future__ import annotations

import os
import platform

import torch


def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import timm

    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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
