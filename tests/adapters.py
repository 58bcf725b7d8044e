"""Adapters and models with a visible effect, for the export and fuse tests.

A freshly added LoRA has lora_b = 0 and changes nothing, which would make any
comparison pass; these get random non-zero lora_b (and, for DoRA, magnitudes
away from the base weight norms) so the adapter clearly moves the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import toss_mlx  # noqa: F401  (BLAS before mlx)

TOKENS = [3, 17, 42, 99, 150, 7, 260, 31, 5, 88, 120, 64]


def make_adapter(model_dir: Path, folder: Path, *, dora: bool = False, num_layers: int = -1,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 4,
                 alpha: float = 8.0, seed: int = 0, amplitude: float = 0.5,
                 extra: dict | None = None) -> Path:
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    from toss_mlx.models.load import load_model
    from toss_mlx.models.lora import LoraSettings, add_lora, save_adapter

    model, _ = load_model(str(model_dir), quiet=True)
    config = add_lora(model, LoraSettings(rank=rank, alpha=alpha, targets=list(targets),
                                          num_layers=num_layers, dora=dora))
    mx.random.seed(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, (LoRALinear, DoRALinear)):
            layer.lora_b = amplitude * mx.random.normal(layer.lora_b.shape)
            if isinstance(layer, DoRALinear):
                layer.m = layer.m * mx.random.uniform(0.5, 1.5, layer.m.shape)
    config.update(extra or {})
    return save_adapter(model, folder, config)


def mlx_logits(model, tokens=TOKENS) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]


def quantized_copy(model_dir: Path, out: Path, group_size: int = 32, bits: int = 4) -> Path:
    """The model folder quantized by mlx-lm (weights, config with its quantization, tokenizer)."""
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    model, _, config = load(str(model_dir), return_config=True)
    model, config = quantize_model(model, config, group_size, bits)
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return out


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def naive_losses(model_dir: Path, adapter: Path, data, **load) -> np.ndarray:
    """The independent reference for every scorer test: one sample at a time, no padding, full
    logits of the model as loaded (quantized, bf16, ...), float64 log-softmax; loss per flat token
    (0 where the token is not a response token)."""
    from toss_mlx.models.load import load_model

    model, _ = load_model(str(model_dir), adapter_path=str(adapter), quiet=True, **load)
    out = []
    for s in data.samples:
        z = mlx_logits(model, s.tokens).astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        losses = np.zeros(len(s.tokens))
        for j in range(1, len(s.tokens)):
            if s.response_mask[j]:
                losses[j] = -logp[j - 1, s.tokens[j]]
        out.append(losses)
    return np.concatenate(out)
