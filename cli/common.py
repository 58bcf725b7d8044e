"""What every command shares: clean error reporting and the app object.

Any exception that reaches a command's boundary becomes one line on stderr,
`error: <what failed>`, and exit code 2: bad input (TossError) as the toolkit
words it, OS errors with the file they concern, and anything else from the
toolkit, MLX or mlx-lm with where it came from. `toss-mlx --debug ...` or
`TOSS_MLX_DEBUG=1` lets the exception through with its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback

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


# What each errno means for the user, and what to do about it.
_OS_PROBLEMS = {
    errno.ENOSPC: "no space left on the device; free some space and rerun the same command "
                  "(finished work is kept)",
    errno.EDQUOT: "disk quota exceeded; free some space and rerun the same command",
    errno.EACCES: "permission denied; choose a path you can write (or read)",
    errno.EPERM: "operation not permitted; choose a path you can write (or read)",
    errno.EROFS: "read-only file system; choose a writable --out",
    errno.ENOENT: "not found",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENOMEM: "out of memory",
    errno.EIO: "input/output error (a failing disk or a lost network mount?)",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _origin(exc: BaseException) -> str:
    """The library the exception was raised in: 'mlx_lm', 'mlx', 'safetensors', ... or ''."""
    tb = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(tb):
        parts = frame.filename.replace("\\", "/").split("/")
        for lib in ("toss_mlx", "mlx_lm", "mlx", "safetensors", "transformers", "tokenizers",
                    "datasets", "yaml", "numpy", "jinja2"):
            if lib in parts:
                return lib
    return ""


def describe(exc: BaseException) -> str:
    """One line saying what failed, on which file, and (where known) what to do."""
    if isinstance(exc, TossError):
        return str(exc)
    if isinstance(exc, OSError):
        problem = _OS_PROBLEMS.get(exc.errno) or _one_line(exc.strerror or exc) or type(exc).__name__
        names = [str(n) for n in (exc.filename, getattr(exc, "filename2", None)) if n is not None]
        return f"{' -> '.join(names)}: {problem}" if names else problem
    if isinstance(exc, UnicodeDecodeError):
        return (f"input is not UTF-8 text ({exc.encoding} cannot decode byte "
                f"0x{exc.object[exc.start]:02x} at byte {exc.start}); save the file as UTF-8")
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --batch-size / --batch-tokens or --max-seq-len"
    origin = _origin(exc)
    where = f" in {origin}" if origin else ""
    return (f"{type(exc).__name__}{where}: {_one_line(exc) or 'no message'} "
            f"(rerun with --debug for the traceback)")


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
