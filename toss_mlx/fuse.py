"""Fuse an adapter into its base model and write a plain mlx-lm model folder.

Built on mlx-lm's own machinery, as `mlx_lm.fuse` does it: each LoRA/DoRA
layer's `fuse()` folds scale * B^T A^T (and DoRA's magnitude) into the base
weight and, for a quantized base, requantizes with the base's group size and
bits unless asked to dequantize; `mlx_lm.utils.save` writes config, weights
and tokenizer. What this adds: the base model's own dtype is kept, the output
folder is written atomically, and bad input is a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .checks import check_writable
from .export import check_output, is_earlier_output, read_adapter
from .io import TossError, atomic_dir, write_failed
from .models.load import apply_adapter, is_quantized, resolve_model_path

README_MARK = "<!-- written by toss-mlx fuse -->"


@dataclass
class FuseResult:
    out: Path
    fused_modules: int
    quantized: bool  # whether the written model is quantized


def _base_dtype(layer: nn.Module) -> mx.Dtype:
    """The float dtype of a LoRA layer's base weight (a quantized one's scales)."""
    base = layer.linear
    return base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype


def fuse_layers(model: nn.Module, dequantize: bool = False) -> int:
    """Fold every adapter layer of `model` into its base weight in place; return how many."""
    fused = []
    for name, layer in model.named_modules():
        if not hasattr(layer, "fuse"):
            continue
        dtype = _base_dtype(layer) if hasattr(layer, "linear") else None
        new = layer.fuse(dequantize=dequantize)
        # DoRA's fuse multiplies by its float32 magnitude; keep the base model's dtype.
        if isinstance(new, nn.QuantizedLinear) and dtype is not None:
            new.scales = new.scales.astype(dtype)
            if "biases" in new and new["biases"] is not None:
                new.biases = new.biases.astype(dtype)
        elif isinstance(new, nn.Linear) and dtype is not None:
            new.weight = new.weight.astype(dtype)
        fused.append((name, new))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def _is_fused_model(folder: Path) -> bool:
    return is_earlier_output(folder, README_MARK)


def _readme(model_spec: str, adapter_dir: Path, quantized: bool, config: dict) -> str:
    q = config.get("quantization") if quantized else None
    weights = (f"quantized ({q.get('bits')}-bit, group size {q.get('group_size')}), as the base"
               if isinstance(q, dict) else "not quantized")
    return "\n".join([
        "",
        "# Fused model (toss-mlx fuse)",
        README_MARK,
        "",
        f"- Base model: `{model_spec}`",
        f"- Adapter folded into the weights: `{adapter_dir}`",
        f"- Weights: {weights}",
        "",
        "Load it like any mlx-lm model:",
        "",
        "```sh",
        'mlx_lm.generate --model THIS_FOLDER --prompt "Hello"',
        "```",
        "",
        "A requantized model differs slightly from base + adapter (the sum is rounded to the "
        "quantization grid again); `--dequantize` keeps the exact sum in float.",
        "",
    ])


def fuse_adapter(model_spec: str, adapter_dir: str | os.PathLike, out: str | os.PathLike,
                 dequantize: bool = False) -> FuseResult:
    """Merge the mlx-lm adapter in `adapter_dir` into `model_spec` and save it to `out`."""
    from mlx_lm.utils import dequantize_model, load, save

    adapter_dir, out = Path(adapter_dir), Path(out)
    read_adapter(adapter_dir)  # clear errors for a bad adapter before loading any model
    path = resolve_model_path(model_spec)
    sources = [adapter_dir] + ([Path(path)] if Path(path).exists() else [])
    check_output(out, *sources)
    check_writable(out, "fused model folder", folder=True)  # before loading the model
    if out.exists() and any(out.iterdir()) and not _is_fused_model(out):
        raise TossError(f"{out}: folder exists and holds other files; "
                        "choose another --out or empty it")
    try:
        # mlx_lm.load keeps the stored dtype and quantization (load_model would dequantize).
        model, tokenizer, config = load(path, return_config=True)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: truncated weights
        raise TossError(f"{model_spec}: could not load the model ({' '.join(str(e).split())})") from None
    apply_adapter(model, adapter_dir)
    count = fuse_layers(model, dequantize=dequantize)
    if dequantize:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    quantized = is_quantized(model)
    with atomic_dir(out, replaceable=_is_fused_model) as tmp:
        try:
            save(tmp, path, model, tokenizer, config, donate_model=False)
        except RuntimeError as e:  # mlx's "[write] Unable to write": usually a full disk
            raise write_failed(out, e) from None
        with open(tmp / "README.md", "a") as f:
            f.write(_readme(model_spec, adapter_dir, quantized, config))
    return FuseResult(out, count, quantized)
