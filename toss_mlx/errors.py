"""One line for any exception: what failed, on which file, and what to do about it.

The CLI prints `describe(exc)` for every error that reaches a command's boundary (exit
code 2): bad input (TossError) as the toolkit words it, OS errors with the file they
concern, and anything else from the toolkit, MLX or mlx-lm with where it came from.
"""

from __future__ import annotations

import errno
import traceback

from .io import TossError

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
