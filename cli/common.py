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
