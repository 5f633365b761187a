"""Which machine produced a profile: numbers without it cannot be compared."""

from __future__ import annotations

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version

import torch


def _cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, ``platform`` elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info(device: str) -> dict:
    """CPU, GPU (when ``device`` is cuda), thread count and library versions.

    ``torch_threads`` is read at call time: call this after setting the threads
    the benchmark runs with.
    """
    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "memory_bytes": props.total_memory,
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "qlsearch": _version("qlsearch"),
    }


def machine_tag(info: dict) -> str:
    """A file-name-safe name for the machine, e.g. ``cpu-amd-epyc-2t`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if info.get("gpu"):
        name = f"cuda-{info['gpu']['name']}"
    else:
        name = f"cpu-{info['cpu']}-{info['torch_threads']}t"
    name = re.sub(r"\((r|tm)\)|processor|\d+-core", "", name.lower())
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-.")
