"""One line naming the machine a benchmark ran on, printed by every script."""

from __future__ import annotations

import os
import platform


def _cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
    except OSError:  # not Linux
        return {}


def describe() -> str:
    """CPU model, cores, native bfloat16/AMX, GPU, torch and its threads, load average."""
    import torch

    info = {k.strip(): v.strip() for k, v in _cpuinfo().items()}
    flags = set(info.get("flags", "").split())
    extras = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
              if flag in flags]
    cpu = info.get("model name") or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores" + (f" ({', '.join(extras)})" if extras else "")
            + f", {gpu}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"load average {os.getloadavg()[0]:.2f}")
