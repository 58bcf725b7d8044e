"""What every command shares: clean error reporting and the app object.

Any exception that reaches a command's boundary becomes one line on stderr,
`error: <what failed>`, and exit code 2: bad input (TossError) as the toolkit
words it, OS errors with the file they concern, and anything else from the
toolkit, MLX or mlx-lm with where it came from. `toss-mlx --debug ...` or
`TOSS_MLX_DEBUG=1` lets the exception through with its traceback.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

import toss_mlx  # noqa: F401  (preloads BLAS before anything imports mlx.core)
from toss_mlx.errors import describe

app = typer.Typer(
    name="toss-mlx",
    help="Token-level data selection for safe LLM fine-tuning (TOSS, TOSS-Pro) on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEBUG_ENV = "TOSS_MLX_DEBUG"
_debug_flag = False  # set by --debug on every invocation (not kept in os.environ, so no leak)


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error "
                               "(same as TOSS_MLX_DEBUG=1)."),
) -> None:
    global _debug_flag
    _debug_flag = debug


def debugging() -> bool:
    return _debug_flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# Exceptions that are the CLI's own control flow, not errors: typer's (it vendors its own
# click) and click's, should a command raise one of those.
# (typer 0.29 vendors click and does not install it; older typer uses click itself.)
_CONTROL: tuple[type[BaseException], ...] = (
    SystemExit, typer.Exit, typer.Abort,
    next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
)
try:
    import click

    _CONTROL += (click.exceptions.Exit, click.exceptions.Abort, click.ClickException)
except ImportError:
    pass


# The model-loading options, spelled and explained the same in every command that loads
# a model (train, score, eval, refine; fuse has --keep-quantized/--dequantize).
DTYPE_HELP = ("Compute dtype: float32, bfloat16 or float16 (default: float32 on a CPU, "
              "bfloat16 on a GPU or with --keep-quantized).")
KEEP_QUANTIZED_HELP = ("Keep a quantized base quantized (QLoRA) on any device, computing in "
                       "bfloat16 unless --dtype says otherwise: the path a Mac takes. By default "
                       "the CPU dequantizes (its quantized and 16-bit matmuls are slow).")


def friendly(fn):
    """Turn any exception into a one-line message and exit code 2 (no traceback unless debugging)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _CONTROL:
            raise  # typer.Exit, BadParameter and sys.exit carry their own message and code
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as e:
            if debugging():
                raise
            typer.secho(f"error: {describe(e)}", fg=typer.colors.RED, err=True)
            sys.exit(2)

    return wrapper
