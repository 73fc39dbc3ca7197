"""What a result was measured on: recorded in every JSON the CLI writes.

Float results depend on the PyTorch build, the number of threads (the
order of parallel reductions) and the CPU's vector instructions, so the
last digits of an accuracy can differ between machines even with the same
seed; timings depend on everything else running there too.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

__all__ = ["machine"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """``{torch, python, platform, cpu, cpu_count, threads}`` of this process, JSON-friendly."""
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
