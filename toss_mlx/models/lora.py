"""LoRA / DoRA adapters in mlx-lm's layout (adapters.safetensors + adapter_config.json).

Built on `mlx_lm.tuner.utils.linear_to_lora_layers`; adapters written here load
with `mlx_lm.load(model, adapter_path=...)`, `mlx_lm.generate --adapter-path`
and `mlx_lm.fuse`. LoRA's `alpha` follows the PEFT convention (scale =
alpha / rank); mlx-lm stores the resulting `scale`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..cache import adapter_fingerprint, is_adapter_folder
from ..checks import read_adapter_config
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


class AdapterSet:
    """One base model, several adapter folders applied in place one at a time: never two bases.

    `use(i)` puts adapter i on the model (`None` in `folders` is the bare base);
    `applied(i)` does so for a `with` block and leaves the bare base after it;
    `close()` leaves the bare base. When consecutive adapters share their LoRA
    structure (type, layers, rank, target modules, weight shapes), only the small
    LoRA weights and the scale are swapped; otherwise the layers are removed and
    the next adapter's added. Every parameter an adapter's config creates must come
    from its file (mlx-lm loads adapters non-strictly, so a missing one would stay
    random): `check()` applies each adapter once, so a mismatch fails in seconds.
    A "full" fine-tune checkpoint (whole weights) is undone by restoring the base's
    parameters, which mlx arrays make cheap (the references are kept, not copies).
    """

    def __init__(self, model: nn.Module, folders: Sequence[str | os.PathLike | None]):
        self.model = model
        self.folders = [Path(f) if f is not None else None for f in folders]
        self.configs: list[dict[str, Any] | None] = []
        self.weights: list[dict[str, mx.array] | None] = []
        for p in self.folders:
            if p is None:
                self.configs.append(None)
                self.weights.append(None)
                continue
            if not is_adapter_folder(p):
                raise TossError(f"{p}: not an adapter folder (needs adapter_config.json and "
                                "adapters.safetensors)")
            try:
                # type-checked: num_layers "abc" or scale "nan" fail here, in one line
                self.configs.append(read_adapter_config(p))
                self.weights.append(mx.load(str(p / "adapters.safetensors")))
            except (json.JSONDecodeError, OSError, RuntimeError, ValueError) as e:
                raise TossError(f"{p}: unreadable adapter ({e})") from None
        strip_adapters(model)
        self._base = tree_flatten(model.parameters())  # references: mlx arrays are immutable
        self.current: int | None = None

    def fingerprint(self, i: int) -> str | None:
        """`toss_mlx.cache.adapter_fingerprint` of adapter i (None for the bare base)."""
        folder = self.folders[i]
        return adapter_fingerprint(folder) if folder is not None else None

    def _kind(self, i: int) -> str | None:
        config = self.configs[i]
        return None if config is None else config.get("fine_tune_type", "lora")

    def _structure(self, i: int) -> str | None:
        if self._kind(i) not in ("lora", "dora"):
            return None
        params = dict(self.configs[i].get("lora_parameters", {}))
        params.pop("scale", None)
        params.pop("dropout", None)
        shapes = sorted((k, tuple(v.shape)) for k, v in self.weights[i].items())
        return json.dumps([self._kind(i), self.configs[i].get("num_layers"), params, shapes],
                          sort_keys=True, default=str)

    def _bare(self) -> None:
        strip_adapters(self.model)
        self.model.update(tree_unflatten(self._base))  # also undoes "full" fine-tune weights
        self.model.eval()

    def use(self, i: int) -> nn.Module:
        """Adapter i on the model, in place; returns the model."""
        if self.current == i:
            return self.model
        from .load import apply_adapter

        shared = self.current is not None and self._structure(i) is not None \
            and self._structure(i) == self._structure(self.current)
        if shared:
            self.model.load_weights(list(self.weights[i].items()), strict=False)
            scale = self.configs[i].get("lora_parameters", {}).get("scale")
            if scale is not None:
                for _, module in self.model.named_modules():
                    if "lora_a" in module and hasattr(module, "scale"):
                        module.scale = scale
        else:
            self._bare()
            self.current = None
            if self.folders[i] is not None:
                apply_adapter(self.model, self.folders[i])
                self._check_complete(i)
        self.model.eval()
        self.current = i
        return self.model

    def _check_complete(self, i: int) -> None:
        if self._kind(i) == "full":
            return
        expected = {name for name, _ in tree_flatten(self.model.parameters())
                    if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}
        missing = sorted(expected - set(self.weights[i]))
        if missing:
            raise TossError(f"{self.folders[i]}: adapter does not match the base model: its config "
                            f"adds {len(expected)} adapter weights, but the file lacks "
                            f"{len(missing)} (e.g. {missing[0]})")

    @contextmanager
    def applied(self, i: int) -> Iterator[nn.Module]:
        """Adapter i on the model for the block; the bare base after it, even on errors."""
        try:
            yield self.use(i)
        finally:
            self.close()

    def check(self) -> None:
        """Apply and remove every adapter once, so that a mismatch fails before any real work."""
        for i in range(len(self.folders)):
            with self.applied(i):
                pass

    def close(self) -> None:
        """Leave the bare base model."""
        self._bare()
        self.current = None


@contextmanager
def adapter_applied(model: nn.Module, folder: str | os.PathLike | None) -> Iterator[nn.Module]:
    """One adapter folder on `model` in place for the block (None: the bare base), then the base."""
    with AdapterSet(model, [folder]).applied(0) as m:
        yield m
