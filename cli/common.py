"""What every command shares: clean error reporting and the app object."""

from __future__ import annotations

import functools
import sys

import typer

import toss_mlx  # noqa: F401  (preloads BLAS before anything imports mlx.core)
from toss_mlx.io import TossError

app = typer.Typer(
    name="toss-mlx",
    help="Token-level data selection for safe LLM fine-tuning (TOSS, TOSS-Pro) on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# The model-loading options, spelled and explained the same in every command that loads
# a model (train, score, eval, refine; fuse has --keep-quantized/--dequantize).
DTYPE_HELP = ("Compute dtype: float32, bfloat16 or float16 (default: float32 on a CPU, "
              "bfloat16 on a GPU or with --keep-quantized).")
KEEP_QUANTIZED_HELP = ("Keep a quantized base quantized (QLoRA) on any device, computing in "
                       "bfloat16 unless --dtype says otherwise: the path a Mac takes. By default "
                       "the CPU dequantizes (its quantized and 16-bit matmuls are slow).")


def friendly(fn):
    """Turn TossError (bad input) into a one-line message and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TossError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper
