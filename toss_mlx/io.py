"""Files: user-facing errors, atomic writes, fingerprints, safetensors with metadata.

Every file the toolkit writes goes through a temp file + rename, so a run
killed at any moment never leaves a half-written file that later loads.
Everything it reads is JSON, YAML (safe loader) or safetensors: no pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class TossError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds.

    On any failure (disk full included) the temp file is removed, and so is a sibling
    `<temp>.safetensors` that writers appending a suffix (mx.save_safetensors) leave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".safetensors")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike,
               replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temp folder next to `path`; it becomes `path` only if the block succeeds.

    An existing non-empty `path` is replaced only when `replaceable(path)` says it is an
    earlier output of the same kind; anything else is refused before any work starts.
    The old folder is moved aside before the new one is renamed in, so a crash at any
    moment leaves either folder complete on disk.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise TossError(f"{path}: exists and is not a folder")
        if any(path.iterdir()) and not (replaceable and replaceable(path)):
            raise TossError(f"{path}: folder exists and holds other files; "
                            "choose another output folder or empty it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any folder
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_failed(path: str | os.PathLike, exc: BaseException) -> TossError:
    """The error for a writer that failed without an errno (mlx raises RuntimeError('[write] ...')).

    The usual cause is a full disk, so the message says how much space is left.
    """
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    reason = " ".join(str(exc).split())
    if "os error 28" in reason or (free is not None and free < 1 << 20):
        return TossError(f"{path}: no space left on the device ({free or 0:,} bytes free; {reason}); "
                         "free some space and rerun the same command (finished work is kept)")
    return TossError(f"{path}: could not write ({reason})")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise TossError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TossError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray],
                metadata: dict[str, Any] | None = None) -> None:
    """Atomically write numpy arrays + string metadata as safetensors."""
    from safetensors.numpy import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(arrays, str(tmp), metadata=meta)
        except OSError:
            raise
        except Exception as e:  # SafetensorError("... No space left on device (os error 28)")
            raise write_failed(path, e) from None
        # save_file replaces the temp file by a new one (mode 0600); give it the user's umask.
        os.chmod(tmp, 0o666 & ~_umask())


def load_arrays(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file into numpy arrays + its string metadata, with clear errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise TossError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise TossError(f"{path}: {what} is empty")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise TossError(f"{path}: not a readable safetensors {what} ({e})") from None
    return arrays, meta
