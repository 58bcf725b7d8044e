"""The machine a benchmark ran on, measured (not written by hand), for every bench script."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import toss_mlx  # noqa: F401  (preloads BLAS before mlx.core; its status is reported below)


def machine() -> str:
    """System, CPU architecture and cores, the MLX version and device, the BLAS in use."""
    import mlx.core as mx

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
            f"mlx {mx.__version__} ({mx.default_device()}), "
            f"BLAS {toss_mlx.blas.status[0] or 'default'}")


def machine_details() -> dict:
    """The machine: platform, CPU, cores, memory, load, library versions and the BLAS in use."""
    import mlx.core as mx
    import mlx_lm

    from toss_mlx import blas

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    mem = None
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = round(kb / 2**20, 1)
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device()),
            "blas": " ".join(str(x) for x in blas.status if x), "load_average_start": os.getloadavg()}
