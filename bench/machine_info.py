"""The machine a benchmark ran on, measured (not written by hand), for every bench script."""

from __future__ import annotations

import os
import platform

import toss_mlx  # noqa: F401  (preloads BLAS before mlx.core; its status is reported below)


def machine() -> str:
    """System, CPU architecture and cores, the MLX version and device, the BLAS in use."""
    import mlx.core as mx

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
            f"mlx {mx.__version__} ({mx.default_device()}), "
            f"BLAS {toss_mlx.blas.status[0] or 'default'}")
