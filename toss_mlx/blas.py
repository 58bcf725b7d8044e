"""Fast BLAS for MLX on Linux CPUs.

The Linux `mlx[cpu]` wheel links the netlib *reference* BLAS (~6 GFLOP/s for a
1024x1024 fp32 matmul on a 2-core x86 machine). Loading an OpenBLAS with
RTLD_GLOBAL *before* `mlx.core` is imported makes MLX's `cblas_sgemm` resolve
to it: 15-30x faster, the same effect as LD_PRELOAD. This module must not
import mlx itself; `toss_mlx/__init__.py` calls `setup()` first thing.

`TOSS_MLX_BLAS=/path/to/libblas.so` picks a library, `TOSS_MLX_BLAS=none`
disables the preload. On macOS nothing happens: MLX uses Accelerate/Metal.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

ENV_VAR = "TOSS_MLX_BLAS"

# Debian/Ubuntu (libopenblas0-pthread, libopenblas0-openmp), Fedora, Arch, Alpine.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/libopenblas.so",
]

# What setup() did, for `toss-mlx doctor`: (library path or None, reason).
status: tuple[str | None, str] = (None, "not attempted")


def find_openblas() -> str | None:
    """Return the first OpenBLAS shared library found on this system, or None."""
    for pattern in CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(path):
                return path
    return None


def setup() -> tuple[str | None, str]:
    """Preload a fast BLAS if we are on Linux and mlx.core is not imported yet."""
    global status
    choice = os.environ.get(ENV_VAR, "").strip()
    if not sys.platform.startswith("linux"):
        status = (None, f"not needed on {sys.platform} (MLX uses its own BLAS)")
    elif choice.lower() in ("none", "0", "off", "false"):
        status = (None, f"disabled by {ENV_VAR}={choice}")
    elif "mlx.core" in sys.modules and status[0] is None:
        status = (None, "mlx.core was imported before toss_mlx; import toss_mlx first")
    elif status[0] is not None:
        pass  # already loaded
    else:
        path = choice or find_openblas()
        if path is None:
            status = (None, "no OpenBLAS found (apt-get install libopenblas0-pthread); "
                            "using MLX's reference BLAS, which is slow")
        else:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                status = (path, "preloaded")
            except OSError as e:
                status = (None, f"could not load {path}: {e}")
    return status
