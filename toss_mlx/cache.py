"""One way to decide whether a result on disk can be reused: keys made from its inputs.

A cached result (a scores shard, an evaluation part, a pipeline stage, a TOSS-Pro round,
a benchmark step) is reused only when everything it was made from is unchanged: the
settings, the content of every input file, the adapters (config *and* weights) and the
toolkit's format version. Never because a file exists.

    key = cache_key({"settings": s, "data": Path("d.jsonl"), "safety": Path("adapters/h")})
    store = KeyedStore(Path("run/.parts"))
    value = store.load("utility", key)        # None unless saved with this very key
    if value is None:
        value = compute(); store.save("utility", key, value)

`cache_key` turns dataclasses into dicts, `Path`s into content fingerprints (a file's
sha256; an adapter folder's `adapter_fingerprint`; any other folder's files, by name and
hash) and hashes the canonical JSON together with `FORMAT_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from .io import TossError, read_json, sha256_bytes, sha256_file, write_json

# Bump when any cached or written layout changes meaning: every key made before stops matching.
FORMAT_VERSION = 2

ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return all((p / name).is_file() for name in ADAPTER_FILES)


def adapter_fingerprint(folder: str | os.PathLike) -> str:
    """The one adapter fingerprint: sha256 over adapter_config.json's and the weights' hashes.

    The config is part of it because it changes the model as much as the weights do
    (scale, rank, layers, dropout, DoRA).
    """
    p = Path(folder)
    if not is_adapter_folder(p):
        raise TossError(f"{p}: not an adapter folder (needs {' and '.join(ADAPTER_FILES)})")
    return sha256_bytes("".join(f"{name}:{sha256_file(p / name)}\n" for name in ADAPTER_FILES))


def path_fingerprint(path: str | os.PathLike) -> str:
    """A file's sha256; an adapter folder's adapter_fingerprint; any other folder's files."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if is_adapter_folder(p):
        return adapter_fingerprint(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return sha256_bytes("".join(f"{f.relative_to(p)}:{sha256_file(f)}\n" for f in files))
    return f"missing:{p}"


def _canonical(value: Any) -> Any:
    """JSON-able form of a key's inputs: Paths become content fingerprints."""
    if isinstance(value, Path):
        return {"path_sha256": path_fingerprint(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # json.dumps would write NaN/Infinity, which is not JSON
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def cache_key(inputs: Any) -> str:
    """sha256 of the canonical JSON of `inputs` (with Path contents) and FORMAT_VERSION."""
    doc = {"format_version": FORMAT_VERSION, "inputs": _canonical(inputs)}
    return sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")))


class KeyedStore:
    """A folder of JSON results, each saved with the key it was made from.

    `load(name, key)` returns the value only when it was saved under exactly that key;
    a missing, unreadable or differently keyed file reads as None (so the work is redone).
    Files are written atomically.
    """

    def __init__(self, folder: str | os.PathLike):
        self.dir = Path(folder)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def key_of(self, name: str) -> str | None:
        """The key a result was saved with, or None."""
        try:
            doc = read_json(self.path(name))
        except (TossError, OSError):
            return None
        return doc.get("key") if isinstance(doc, dict) else None

    def load(self, name: str, key: str) -> Any:
        try:
            doc = read_json(self.path(name))
        except (TossError, OSError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        return doc.get("value")

    def save(self, name: str, key: str, value: Any) -> None:
        write_json(self.path(name), {"key": key, "value": value})

    def discard(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
