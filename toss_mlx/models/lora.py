"""LoRA / DoRA adapters in mlx-lm's layout (adapters.safetensors + adapter_config.json).

Built on `mlx_lm.tuner.utils.linear_to_lora_layers`; adapters written here load
with `mlx_lm.load(model, adapter_path=...)`, `mlx_lm.generate --adapter-path`
and `mlx_lm.fuse`. LoRA's `alpha` follows the PEFT convention (scale =
alpha / rank); mlx-lm stores the resulting `scale`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..io import TossError, atomic_path, write_failed, write_json


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_layers: int = -1  # -1: every layer; n: the last n layers (mlx-lm's convention)
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _layer_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Map leaf names (q_proj) to mlx-lm's per-layer module paths (self_attn.q_proj)."""
    names = [name for name, _ in model.layers[0].named_modules() if name]
    keys = sorted(name for name in names if name.rsplit(".", 1)[-1] in targets or name in targets)
    missing = [t for t in targets if not any(k == t or k.endswith("." + t) for k in keys)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise TossError(f"LoRA targets {missing} are not modules of this model's layers "
                        f"(available: {', '.join(leaves)})")
    return keys


def adapter_config(model: nn.Module, s: LoraSettings, **extra: Any) -> dict[str, Any]:
    """The adapter_config.json mlx-lm expects, plus our own settings under other keys."""
    n = len(model.layers) if s.num_layers < 0 else min(s.num_layers, len(model.layers))
    return {
        "fine_tune_type": "dora" if s.dora else "lora",
        "num_layers": n,
        "lora_parameters": {"rank": s.rank, "scale": s.scale, "dropout": s.dropout,
                            "keys": _layer_keys(model, s.targets)},
        **extra,
    }


def add_lora(model: nn.Module, s: LoraSettings) -> dict[str, Any]:
    """Freeze the base and add trainable LoRA layers in place; return the adapter config."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if s.rank < 1:
        raise TossError(f"LoRA rank must be at least 1, got {s.rank}")
    if s.num_layers > len(model.layers):
        raise TossError(f"num_layers={s.num_layers} but the model has {len(model.layers)} layers")
    config = adapter_config(model, s)
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=s.dora)
    return config


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(model: nn.Module, folder: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write an mlx-lm adapter folder; each file atomically, the weights last.

    A run killed at any moment leaves either the previous complete adapter or a
    folder without weights (which fails to load loudly), never a half-written one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "adapter_config.json", config)
    save_mx_arrays(folder / "adapters.safetensors", adapter_weights(model))
    return folder


def save_mx_arrays(path: str | os.PathLike, arrays: dict[str, mx.array],
                   metadata: dict[str, str] | None = None) -> None:
    """Atomically write mlx arrays (any dtype, bfloat16 included) as safetensors."""
    with atomic_path(path) as tmp:
        # mx.save_safetensors appends ".safetensors" to names lacking it.
        target = tmp.with_name(tmp.name + ".safetensors")
        try:
            mx.save_safetensors(str(target), arrays, metadata=metadata or {})
        except RuntimeError as e:  # mlx's "[write] Unable to write": usually a full disk
            raise write_failed(path, e) from None
        os.replace(target, tmp)


def strip_adapters(model: nn.Module) -> None:
    """Replace every LoRA/DoRA layer by the base layer it wraps (the base weights are untouched)."""
    base = []
    for name, module in model.named_modules():
        if "lora_a" in module:
            inner = getattr(module, "linear", None)
            if inner is None:
                inner = getattr(module, "embedding", None)
            if inner is not None:
                base.append((name, inner))
    if base:
        model.update_modules(tree_unflatten(base))
