"""toss-mlx: token-level data selection for safe LLM fine-tuning (TOSS, TOSS-Pro) on MLX.

Importing this package preloads a fast BLAS on Linux before `mlx.core` is
imported anywhere (see `toss_mlx.blas`), so import `toss_mlx` before `mlx`.
"""

from . import blas as _blas

_blas.setup()

__version__ = "0.1.0"
