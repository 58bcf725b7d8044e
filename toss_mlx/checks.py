"""Checks of user input that many commands share, each raising TossError with one clear line.

Numbers (finite, in a range), choices (with the closest valid one), output paths
that must be writable before any compute starts, an adapter_config.json whose
fields have the types mlx-lm will use, and an exclusive lock on an output
folder so two processes never write the same run.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import errno
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .io import TossError, read_json

# ---------------------------------------------------------------- numbers and choices


def finite(value: Any, name: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, where: str = "") -> float:
    """`value` as a float, checked finite and within [low, high] (open ends when asked)."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TossError(f"{prefix}{name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise TossError(f"{prefix}{name} must be a finite number, got {value!r}")
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is None:
            rng = f"at most {high:g}" if not high_open else f"below {high:g}"
        elif high is None:
            rng = f"at least {low:g}" if not low_open else f"above {low:g}"
        else:
            rng = f"in {lo}, {hi}"
        raise TossError(f"{prefix}{name} must be {rng}, got {value!r}")
    return x


def integer(value: Any, name: str, low: int | None = None, *, where: str = "",
            also: Iterable[int] = ()) -> int:
    """`value` as an int (not a bool), at least `low` unless it is one of `also`."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TossError(f"{prefix}{name} must be an integer, got {value!r}")
    allowed = tuple(also)
    if low is not None and value < low and value not in allowed:
        extra = "".join(f" or {a}" for a in allowed)
        raise TossError(f"{prefix}{name} must be at least {low}{extra}, got {value}")
    return value


def choice(value: Any, name: str, choices: Iterable[str], where: str = "") -> str:
    """`value` if it is one of `choices`, else an error naming them and the closest one."""
    options = list(choices)
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    prefix = f"{where}: " if where else ""
    raise TossError(f"{prefix}{name} must be one of {', '.join(options)}, got {value!r}{hint}")


# ---------------------------------------------------------------- output paths


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, what: str = "output", folder: bool = False) -> None:
    """Fail now, not after the compute, if `path` cannot be written.

    `folder=True`: `path` is a folder to create or fill; else a file to create or
    replace. The test writes (and removes) an empty temp file in the nearest
    existing folder: permission bits alone say nothing when running as root, and a
    read-only mount or a path under a file only shows when writing.
    """
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise TossError(f"{path}: {what} exists and is not a folder")
        if not folder and path.is_dir():
            raise TossError(f"{path}: {what} is a folder; give a file name")
    base = path if (folder and path.is_dir()) else _existing_ancestor(path.parent)
    if not base.is_dir():
        raise TossError(f"{path}: {what} cannot be created: {base} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".toss-mlx-write-test.", dir=base)
    except OSError as e:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or str(e))
        raise TossError(f"{path}: {what} is not writable ({base}: {reason}); "
                        "choose another output path") from None
    os.close(fd)
    os.unlink(tmp)


def check_not_inside(out: str | os.PathLike, folder: str | os.PathLike, what: str) -> None:
    """Refuse an output path that is `folder` or lies inside it (it would be written into its input)."""
    o, f = Path(out).resolve(), Path(folder).resolve()
    if o == f or f in o.parents:
        raise TossError(f"{out}: the output must not be inside the {what} {folder}; "
                        "choose a folder outside it")


# ---------------------------------------------------------------- adapter_config.json


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of an mlx-lm adapter folder, with every field mlx-lm uses type-checked.

    mlx-lm would fail deep inside (or, for scale "nan", silently produce NaN logits)
    on a wrong type; here it is one line naming the file and the field.
    """
    path = Path(folder) / "adapter_config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise TossError(f"{path}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("fine_tune_type", "lora")
    choice(kind, "fine_tune_type", ("lora", "dora", "full"), where=str(path))
    if "num_layers" in config:
        integer(config["num_layers"], "num_layers", 1, where=str(path), also=(-1,))
    if kind == "full":
        return config
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
        raise TossError(f"{path}: lora_parameters with rank and scale are missing")
    integer(params["rank"], "lora_parameters.rank", 1, where=str(path))
    finite(params["scale"], "lora_parameters.scale", where=str(path))
    if "dropout" in params:
        finite(params["dropout"], "lora_parameters.dropout", 0, 1, high_open=True, where=str(path))
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise TossError(f"{path}: lora_parameters.keys must be a list of module names, got {keys!r}")
    return config


# ---------------------------------------------------------------- output locks

LOCK_NAME = ".toss-mlx.lock"
_held: dict[Path, int] = {}  # lock file -> its open descriptor, for this process


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(lock: Path) -> None:
    fd = _held.pop(lock, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        lock.unlink()


def _release_all() -> None:
    for lock in list(_held):
        _release(lock)


atexit.register(_release_all)


def lock_file_for(output: str | os.PathLike, folder: bool) -> Path:
    """The lock of an output: `FOLDER/.toss-mlx.lock` for a folder, `.NAME.lock` next to a file."""
    output = Path(output).absolute()
    if folder:
        return output / LOCK_NAME
    return output.with_name(f".{output.name}.lock")


def _rank() -> int:
    import mlx.core as mx

    try:
        return mx.distributed.init().rank()
    except Exception:  # no distributed backend: a single process
        return 0


def _acquire(lock: Path, output: Path) -> bool:
    """Take `lock`; return False if this process held it already.

    Under `mlx.launch` the processes of one job share the output: rank 0 holds the lock.
    """
    if lock in _held or _rank() != 0:
        return False
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise TossError(f"{output}: in use by another toss-mlx process (pid {pid}); "
                                f"wait for it to finish or choose another --out "
                                f"(if pid {pid} is not toss-mlx, delete {lock})") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone (killed), or an earlier one of ours
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[lock] = fd
        return True
    raise TossError(f"{lock}: could not take the lock of {output}")


@contextlib.contextmanager
def locked(output: str | os.PathLike, folder: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of an output folder or file for the block.

    The lock is a file created with O_EXCL that holds the owner's pid, so a
    second process gets an error naming the holder; the lock of a process that
    is gone (killed) is taken over. Nested use in one process (refine -> train)
    is a no-op, and the lock goes at the block's end (or at exit).
    """
    output = Path(output).absolute()
    lock = lock_file_for(output, folder)
    taken = _acquire(lock, output)
    try:
        yield lock
    finally:
        if taken:
            _release(lock)


def hold(output: str | os.PathLike, folder: bool = True) -> Path:
    """Take the lock of `output` until this process exits (for long runs such as `toss-mlx run`)."""
    lock = lock_file_for(output, folder)
    _acquire(lock, Path(output).absolute())
    return lock
