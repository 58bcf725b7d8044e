"""The one cache-key mechanism: keys change with any input, stores refuse other keys."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from toss_mlx.cache import (
    FORMAT_VERSION,
    KeyedStore,
    adapter_fingerprint,
    cache_key,
    path_fingerprint,
)
from toss_mlx.io import TossError


def _adapter(folder: Path, scale: float, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"scale": scale}}))
    (folder / "adapters.safetensors").write_bytes(weights)
    return folder


def test_adapter_fingerprint_covers_config_and_weights(tmp_path):
    a = adapter_fingerprint(_adapter(tmp_path / "a", 20.0, b"w1"))
    assert a == adapter_fingerprint(_adapter(tmp_path / "b", 20.0, b"w1"))
    assert a != adapter_fingerprint(_adapter(tmp_path / "c", 10.0, b"w1"))  # config only
    assert a != adapter_fingerprint(_adapter(tmp_path / "d", 20.0, b"w2"))  # weights only
    # by hand: sha256 of "name:sha\n" lines
    cfg = hashlib.sha256((tmp_path / "a" / "adapter_config.json").read_bytes()).hexdigest()
    w = hashlib.sha256(b"w1").hexdigest()
    assert a == hashlib.sha256(f"adapter_config.json:{cfg}\nadapters.safetensors:{w}\n".encode()).hexdigest()
    with pytest.raises(TossError, match="not an adapter folder"):
        adapter_fingerprint(tmp_path)


def test_cache_key_follows_contents_not_names(tmp_path):
    @dataclasses.dataclass
    class S:
        k: int
        data: Path

    f = tmp_path / "d.jsonl"
    f.write_text("one\n")
    k1 = cache_key(S(1, f))
    assert k1 == cache_key(S(1, f))
    assert k1 != cache_key(S(2, f))
    f.write_text("two\n")
    assert k1 != cache_key(S(1, f))
    assert path_fingerprint(tmp_path / "missing").startswith("missing:")
    assert cache_key({"x": float("nan")}) == cache_key({"x": float("nan")})
    assert FORMAT_VERSION >= 1


def test_keyed_store_returns_only_same_key(tmp_path):
    store = KeyedStore(tmp_path / "parts")
    assert store.load("a", "k1") is None
    store.save("a", "k1", {"v": 1})
    assert store.load("a", "k1") == {"v": 1}
    assert store.load("a", "k2") is None
    assert store.key_of("a") == "k1"
    store.path("a").write_text("{broken")
    assert store.load("a", "k1") is None
    store.discard("a")
    assert not store.path("a").exists()
