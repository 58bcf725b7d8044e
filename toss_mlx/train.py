"""Token-masked LoRA fine-tuning (`toss-mlx train`): the trainer every TOSS step uses.

The safety-degraded and utility reference models, the baselines and the final
token-masked fine-tune all go through `train(settings)`. It builds on mlx-lm
instead of forking it: `mlx_lm.tuner.trainer.train` runs the compiled step
(gradient accumulation, gradient averaging across `mlx.launch` processes), fed
by our batch iterator and masked loss (`toss_mlx.batches`) through its
`iterate_batches` / `loss` hooks. Its `training_callback`, called after every
step, adds what mlx-lm lacks: epochs, validation with a best adapter,
checkpoints with optimizer state for an exact `--resume`, train_log.jsonl and
our own progress bar (mlx-lm's own UI is silenced meanwhile).

mlx-lm writes its adapter file non-atomically, so it writes into a scratch
folder; every file in the output folder is written atomically by us:

  adapters.safetensors, adapter_config.json  the adapter (mlx-lm layout); final once done
  best/                                      best adapter by validation loss (with --valid)
  checkpoints/step_0000100/                  adapter + trainer_state.safetensors (optimizer, step)
  train_log.jsonl                            one line per step
  run.json                                   settings and data fingerprints, checked on --resume
  train_summary.json                         the result, written when the run completes
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from .batches import (
    BatchPlan,
    KeepDataset,
    iterate_batches,
    keep_of_mask,
    masked_eval_loss,
    masked_loss,
    steps_per_epoch,
    use_kept_head,
)
from .cache import adapter_fingerprint
from .checks import check_writable, locked
from .config import build_config, read_yaml
from .data import tokenize_dataset
from .io import TossError, read_json, sha256_file, write_json, write_text
from .models.load import DTYPES, load_model
from .models.lora import LoraSettings, adapter_weights, add_lora, save_adapter, save_mx_arrays
from .progress import Progress

__all__ = ["TrainSettings", "TrainResult", "train", "load_settings", "keep_of_mask"]

STATE_FILE = "trainer_state.safetensors"
# Settings that change what a run computes; --resume refuses a run started with others.
# (data/mask/valid are compared by content fingerprint instead of by path.)
_NOT_TRAJECTORY = {"out", "data", "mask", "valid", "init_adapter", "resume", "overwrite", "quiet",
                   "save_every", "keep_checkpoints", "val_every", "val_batches"}
_RUN_FILES = ("run.json", "checkpoints", "train_log.jsonl", "adapters.safetensors",
              "adapter_config.json", "best", "train_summary.json")


@dataclass
class TrainSettings:
    """Everything `toss-mlx train` takes; defaults follow the TOSS paper's recipe."""

    model: str = ""
    data: str = ""
    out: str = "adapters"
    mask: str | None = None  # mask.safetensors from `toss-mlx select`; none: every response token
    valid: str | None = None
    init_adapter: str | None = None  # start from this adapter's weights (same LoRA settings)
    epochs: int = 2
    iters: int | None = None  # steps (micro-batches); overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 0  # optimizer updates of linear warmup from 0
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0  # adamw only
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_seq_len: int = 2048
    template: Literal["chat", "plain"] = "chat"
    format: str = "auto"
    skip_bad_rows: bool = False
    loss_norm: Literal["token", "sample"] = "token"
    group_by_length: bool = True
    seed: int = 42
    dtype: str | None = None  # float32, bfloat16, float16; default: float32 on CPU, bfloat16 on GPU
    keep_quantized: bool = False  # a quantized base stays quantized on any device (QLoRA), bf16 default
    grad_checkpoint: bool = False
    val_every: int = 100
    val_batches: int = -1  # -1: the whole validation set
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        at_least = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "warmup": 0, "max_seq_len": 2,
                    "seed": 0, "val_every": 1, "save_every": 1, "keep_checkpoints": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"iters must be at least 1, got {self.iters}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        lora = self.lora
        if isinstance(lora, LoraSettings):
            if not (math.isfinite(lora.alpha) and lora.alpha > 0):
                raise ValueError(f"lora.alpha must be a positive finite number, got {lora.alpha}")
            if not (math.isfinite(lora.dropout) and 0 <= lora.dropout < 1):
                raise ValueError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
            if lora.rank < 1:
                raise ValueError(f"lora.rank must be at least 1, got {lora.rank}")
            if lora.num_layers == 0 or lora.num_layers < -1:
                raise ValueError(f"lora.num_layers must be -1 (every layer) or at least 1, "
                                 f"got {lora.num_layers}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.val_batches == 0 or self.val_batches < -1:
            raise ValueError(f"val_batches must be -1 (all) or at least 1, got {self.val_batches}")


_LORA_FLAGS = ("rank", "alpha", "dropout", "targets", "num_layers", "dora")


def load_settings(config: str | None = None, overrides: dict[str, Any] | None = None,
                  **flags: Any) -> TrainSettings:
    """Settings from a YAML file, then `--set key=value` overrides, then flags (None: not given).

    LoRA flags (rank, alpha, dropout, targets, num_layers, dora) go to `lora:`.
    """
    lora = {k: flags.pop(k) for k in _LORA_FLAGS if k in flags}
    lora = {k: v for k, v in lora.items() if v is not None}
    flag_layer = {k: v for k, v in flags.items() if v is not None}
    if lora:
        flag_layer["lora"] = lora
    layers = [read_yaml(config)] if config else []
    settings = build_config(TrainSettings, *layers, overrides or {}, flag_layer,
                            source=str(config or "train settings"))
    missing = [name for name in ("model", "data") if not getattr(settings, name)]
    if missing:
        raise TossError(" and ".join(f"--{m}" for m in missing) + " required (a flag or a key of --config)")
    return settings


@dataclass
class TrainResult:
    out: Path
    steps: int  # steps done when the run ended (all of them unless interrupted)
    total_steps: int
    epochs: float
    train_loss: float | None  # mean over the last epoch's worth of steps of this session
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    trained_tokens: int  # in this session
    kept_share: float | None  # kept / response targets in this session
    seconds: float  # inside mlx-lm's training loop, this session
    tokens_per_sec: float
    peak_memory_gb: float
    resumed_from: int
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> str:
        parts = [f"{self.steps} steps ({self.epochs:.2f} epochs)"]
        if self.resumed_from:
            parts[0] += f", resumed at step {self.resumed_from}"
        if self.train_loss is not None:
            parts.append(f"loss {self.train_loss:.3f}")
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.3f} (best {self.best_val_loss:.3f} at step {self.best_step})")
        if self.kept_share is not None:
            parts.append(f"kept {self.kept_share:.1%} of response tokens")
        parts.append(f"{self.tokens_per_sec:,.0f} tok/s, {self.seconds:.0f}s")
        parts.append(f"peak {self.peak_memory_gb:.2f} GB")
        return "trained " + ", ".join(parts) + f" -> {self.out}"

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["out"] = str(self.out)
        return d


# ---------------------------------------------------------------- output folder


def _run_record(s: TrainSettings, data_fp: dict, valid_fp: dict | None, total_steps: int) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in _NOT_TRAJECTORY}
    return {
        "settings": settings,
        "data": data_fp,
        "mask_sha256": sha256_file(s.mask) if s.mask else None,
        "init_adapter_fingerprint": adapter_fingerprint(s.init_adapter) if s.init_adapter else None,
        "valid": valid_fp,
        "total_steps": total_steps,
    }


def _training_record(s: TrainSettings, data_fp: dict, total_steps: int) -> dict:
    """What adapter_config.json records under "toss" (read by `toss-mlx export`'s README)."""
    settings = {k: v for k, v in dataclasses.asdict(s).items()
                if k not in _NOT_TRAJECTORY | {"lora", "model"}}
    return {"base_model": s.model, "data": s.data, "mask": s.mask,
            "init_adapter": s.init_adapter, "steps": total_steps,
            "dataset_sha256": data_fp["dataset_sha256"], **settings}


SELECTION_KEYS = ("strategy", "level", "ratio", "k", "seed", "removed_tokens", "scored_tokens",
                  "samples_touched", "samples_fully_removed")


def _selection_record(mask: str) -> dict[str, Any]:
    """How the mask was chosen, from its metadata (strategy, ratio, counts)."""
    from safetensors import safe_open

    with safe_open(mask, framework="numpy") as f:
        meta = dict(f.metadata() or {})
    out = {}
    for key in SELECTION_KEYS:
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                out[key] = meta[key]
    return out


def _holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in _RUN_FILES)


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (the state file is written last), oldest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / STATE_FILE).exists())


def _check_out(s: TrainSettings) -> None:
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise TossError(f"{out}: exists and is not a folder")
    check_writable(out, "training output folder", folder=True)
    # A folder with a run.json is resumed when the settings are the same (_start_run).
    if _holds_run(out) and not (s.resume or s.overwrite) and not (out / "run.json").exists():
        raise TossError(f"{out}: already holds a training run; pass --resume to continue it, "
                        "--overwrite to start over, or choose another --out")
    if s.resume and _holds_run(out) and not (out / "run.json").exists():
        raise TossError(f"{out}: --resume needs the run.json of a toss-mlx training run, found none")
    if s.init_adapter and not (Path(s.init_adapter) / "adapters.safetensors").exists():
        raise TossError(f"{s.init_adapter}: initial adapter not found (needs adapters.safetensors)")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _start_run(out: Path, s: TrainSettings, record: dict, rank: int) -> Path | None:
    """Prepare the output folder; return the checkpoint to resume from, if any."""
    if not s.overwrite and (out / "run.json").exists():  # same settings: resume on its own
        old = read_json(out / "run.json")
        diff = _differences(old, json.loads(json.dumps(record)))
        # A run that saved nothing yet (e.g. stopped by bad settings) has nothing to lose.
        started = bool(_checkpoints(out)) or (out / "adapters.safetensors").exists()
        if diff and s.resume and started:
            raise TossError(f"{out}: --resume with settings or data other than the run's:\n  "
                            + "\n  ".join(diff) + "\nuse the original ones, or --overwrite to start over")
        if diff and started:
            raise TossError(f"{out}: already holds a training run with other settings or data:\n  "
                            + "\n  ".join(diff) + "\nuse the original ones to resume it, "
                            "--overwrite to start over, or choose another --out")
        found = _checkpoints(out)
        if found:
            return found[-1]
    if rank == 0:
        for name in _RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        write_json(out / "run.json", record)
    return None


def _load_mx(path: Path, what: str, hint: str = "") -> tuple[dict[str, mx.array], dict[str, str]]:
    if not path.exists():
        raise TossError(f"{path}: {what} not found")
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises several types for corrupt files
        raise TossError(f"{path}: unreadable {what} ({e}){hint}") from None


def _restore(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> tuple[int, dict]:
    """Load a checkpoint's adapter and optimizer state; return (step, metadata)."""
    hint = "; delete this checkpoint folder to resume from an earlier one"
    weights, _ = _load_mx(ckpt / "adapters.safetensors", "checkpoint adapter", hint)
    state, meta = _load_mx(ckpt / STATE_FILE, "trainer state", hint)
    if set(weights) != set(adapter_weights(model)) or "step" not in meta:
        raise TossError(f"{ckpt}: the checkpoint does not match this run's LoRA settings")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())

    def restored(path: str, value: mx.array) -> mx.array:
        if path not in state or state[path].shape != value.shape:
            raise TossError(f"{ckpt}: the optimizer state does not match at {path}")
        return state[path]

    optimizer.state = tree_map_with_path(restored, optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
    return int(meta["step"]), meta


def _load_init_adapter(folder: Path, model: nn.Module) -> None:
    """Continue from an earlier adapter: its weights must fit this run's LoRA layers exactly."""
    weights, _ = _load_mx(folder / "adapters.safetensors", "adapter")
    expected = adapter_weights(model)
    wrong = sorted(k for k in set(weights) | set(expected)
                   if k not in weights or k not in expected or weights[k].shape != expected[k].shape)
    if wrong:
        raise TossError(f"{folder}: the adapter does not fit this run's LoRA settings "
                        f"(rank, targets, num_layers); first mismatch: {wrong[0]}")
    model.load_weights(list(weights.items()), strict=False)


def _save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: optim.Optimizer,
                     config: dict, best: tuple[float | None, int | None], keep: int) -> None:
    ckpt = out / "checkpoints" / f"step_{step:07d}"
    _check_finite_weights(model, step, out)
    save_adapter(model, ckpt, config)
    meta = {"step": str(step), "best_val_loss": json.dumps(best[0]), "best_step": json.dumps(best[1])}
    save_mx_arrays(ckpt / STATE_FILE, dict(tree_flatten(optimizer.state)), meta)
    save_adapter(model, out, config)  # the latest adapter, usable while the run goes on
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def _check_finite_weights(model: nn.Module, step: int, out: Path) -> None:
    """A diverged update (NaN/inf weights) must never overwrite the last good adapter."""
    weights = adapter_weights(model)
    if weights and not all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values()):
        raise TossError(f"step {step}: the adapter weights became NaN or infinite (training "
                        f"diverged); lower --lr. {_last_good(out)}")


def _last_good(out: Path) -> str:
    found = _checkpoints(out)
    if found:
        return f"The last good adapter (step {int(found[-1].name.split('_')[1])}) is kept in {out}."
    return "No adapter was saved."


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step` (the ones the resumed run will not redo)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the kill
    write_text(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------- optimizer


def make_optimizer(s: TrainSettings, total_updates: int) -> optim.Optimizer:
    """Adam/AdamW with a constant or cosine lr, optionally after a linear warmup."""
    from mlx_lm.tuner.utils import build_schedule

    if s.lr_schedule == "cosine":
        lr = build_schedule({"name": "cosine_decay", "warmup": s.warmup,
                             "arguments": [s.lr, max(total_updates - s.warmup, 1), 0.0]})
    elif s.warmup:
        lr = build_schedule({"name": "linear_schedule", "warmup": s.warmup,
                             "arguments": [s.lr, s.lr, 1]})
    else:
        lr = s.lr
    if s.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=s.weight_decay)
    return optim.Adam(learning_rate=lr)


# ---------------------------------------------------------------- mlx-lm's own UI


def _nothing(*args: Any, **kwargs: Any) -> Any:
    return _nothing


class _SilentTrainUI:
    """Stands in for mlx-lm's TrainUI while our own bar runs: every call does nothing.

    (Calls return a no-op too, as `val_task` returns its `advance` function.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _SilentTrainUI:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return _nothing


@contextlib.contextmanager
def _mlx_lm_ui_silenced() -> Iterator[None]:
    """Silence mlx-lm's TrainUI (progress bar and per-step lines) during its training loop.

    mlx-lm's trainer (0.32+) builds `TrainUI` from its module namespace on each call,
    so swapping that name out is enough; its Live display then never starts, and
    never takes over sys.stdout/stderr.
    """
    import mlx_lm.tuner.trainer as trainer

    saved = getattr(trainer, "TrainUI", None)
    trainer.TrainUI = _SilentTrainUI
    try:
        yield
    finally:
        if saved is None:
            del trainer.TrainUI
        else:
            trainer.TrainUI = saved


# ---------------------------------------------------------------- the loop


class _TrainingCallback:
    """mlx-lm's training_callback: runs after each step (log, progress, validation, checkpoints)."""

    def __init__(self, s: TrainSettings, model, optimizer, train_set: KeepDataset,
                 valid_set: KeepDataset | None, out: Path, config: dict, start: int, total: int,
                 best: tuple[float | None, int | None], on_step: Callable[[dict], None] | None):
        self.s, self.model, self.optimizer = s, model, optimizer
        self.train_set, self.valid_set, self.out, self.config = train_set, valid_set, out, config
        self.start, self.total, self.on_step = start, total, on_step
        self.rank = mx.distributed.init().rank()
        self.plan = BatchPlan(train_set.lengths, s.batch_size, s.seed, s.group_by_length)
        self.per_epoch = self.plan.per_epoch
        self.save_every = s.grad_accum * -(-s.save_every // s.grad_accum)  # on update boundaries
        self.lengths, self.kept, self.response = (train_set.lengths, train_set.kept_targets,
                                                  train_set.response_targets)
        self.best_val, self.best_step = best
        self.val_loss: float | None = None
        self.losses: list[float] = []
        self.tokens = self.kept_tokens = self.response_tokens = 0
        self.step = start
        self.t0 = time.perf_counter()
        self.log = None
        self.epochs = math.ceil(total / self.per_epoch)
        self.progress = Progress(enabled=not s.quiet and self.rank == 0)
        self.bar = self.progress.task(f"epoch 1/{self.epochs}", total=total, completed=start,
                                      step=f"{start}/{total}", loss="-", kept="-")

    def reseed(self, step: int) -> None:
        # Dropout randomness is a function of (seed, step), so a resumed run draws the same.
        mx.random.seed(self.s.seed * 1_000_003 + step)

    def on_val_loss_report(self, info: dict) -> None:  # validation is ours, in on_train_loss_report
        pass

    def on_train_loss_report(self, info: dict) -> None:
        s = self.s
        self.step = step = self.start + info["iteration"]
        self.reseed(step)
        rows = self.plan.step(step - 1)
        rows = rows[rows >= 0]
        tokens, kept, response = (int(self.lengths[rows].sum()), int(self.kept[rows].sum()),
                                  int(self.response[rows].sum()))
        self.tokens += tokens
        self.kept_tokens += kept
        self.response_tokens += response
        if not math.isfinite(info["train_loss"]):
            raise TossError(f"step {step}: the training loss is {info['train_loss']} (training "
                            f"diverged); lower --lr or check --alpha. {_last_good(self.out)}")
        self.losses.append(info["train_loss"])
        record = {
            "step": step,
            "epoch": (step - 1) // self.per_epoch + 1,
            "loss": info["train_loss"],
            "lr": info["learning_rate"],
            "tokens": tokens,
            "kept_tokens": kept,
            "response_tokens": response,
            "tokens_per_sec": info["tokens_per_second"],
            "peak_memory_gb": info["peak_memory"],
        }
        if self.valid_set is not None and (step % s.val_every == 0 or step == self.total):
            record["val_loss"] = self.val_loss = self.validate()
            if self.best_val is None or self.val_loss < self.best_val:
                self.best_val, self.best_step = self.val_loss, step
                if self.rank == 0:
                    save_adapter(self.model, self.out / "best",
                                 {**self.config, "val_loss": self.val_loss, "step": step})
        if self.rank == 0:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            if step % s.grad_accum == 0 and (step % self.save_every == 0 or step == self.total):
                _save_checkpoint(self.out, step, self.model, self.optimizer, self.config,
                                 (self.best_val, self.best_step), s.keep_checkpoints)
        kept_share = self.kept_tokens / self.response_tokens if self.response_tokens else None
        self.bar.update(step, tokens=tokens, description=f"epoch {record['epoch']}/{self.epochs}",
                        step=f"{step}/{self.total}", loss=f"{info['train_loss']:.3f}",
                        kept="-" if kept_share is None else f"{kept_share:.1%}")
        if "val_loss" in record:
            self.progress.log(f"step {step}: val loss {record['val_loss']:.3f}")
        if self.on_step is not None:
            self.on_step(record)

    def validate(self) -> float:
        from mlx_lm.tuner.trainer import evaluate

        s = self.s
        loss = evaluate(model=self.model, dataset=self.valid_set, batch_size=s.batch_size,
                        num_batches=s.val_batches, max_seq_length=s.max_seq_len,
                        loss=partial(masked_eval_loss, norm=s.loss_norm),
                        iterate_batches=partial(iterate_batches, group_by_length=s.group_by_length))
        self.model.train()
        return loss

    def run(self) -> float:
        """Train steps start+1 .. total with mlx-lm's trainer; return the seconds it took."""
        from mlx_lm.tuner.trainer import TrainingArgs
        from mlx_lm.tuner.trainer import train as mlx_lm_train

        s = self.s
        remaining = self.total - self.start
        log_path = self.out / "train_log.jsonl"
        with contextlib.ExitStack() as stack:
            if self.rank == 0:
                _truncate_log(log_path, self.start)
                self.log = stack.enter_context(open(log_path, "a"))
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="toss-mlx-train-"))
            args = TrainingArgs(
                batch_size=s.batch_size, iters=remaining, steps_per_report=1,
                steps_per_eval=remaining + 1, steps_per_save=remaining + 1,
                max_seq_length=s.max_seq_len, grad_checkpoint=s.grad_checkpoint,
                grad_accumulation_steps=s.grad_accum,
                adapter_file=str(Path(scratch) / "adapters.safetensors"),  # mlx-lm's own, non-atomic write
            )
            stack.enter_context(_mlx_lm_ui_silenced())
            stack.enter_context(self.progress)
            self.reseed(self.start)
            mx.reset_peak_memory()
            self.t0 = self.bar.start = time.perf_counter()  # tok/s counts from the first step
            mlx_lm_train(
                model=self.model, optimizer=self.optimizer, train_dataset=self.train_set,
                val_dataset=None, args=args, loss=partial(masked_loss, norm=s.loss_norm),
                iterate_batches=partial(iterate_batches, seed=s.seed, start_step=self.start,
                                        group_by_length=s.group_by_length),
                training_callback=self,
            )
            return time.perf_counter() - self.t0


def _say(enabled: bool) -> Callable[[str], None]:
    """A one-line status printer on stderr (stdout stays clean for scripts)."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return console.print if enabled else (lambda text: None)


def train(settings: TrainSettings, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune `settings.model` with LoRA on the kept response tokens of `settings.data`.

    `on_step(record)` is called after each step with its train_log.jsonl record.
    Returns the result (with the trained model in memory as `.model`). The output
    folder is locked meanwhile: a second process training into it gets an error.
    """
    if Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise TossError(f"{settings.out}: exists and is not a folder")
    check_writable(settings.out, "training output folder", folder=True)
    with locked(settings.out):
        return _train(settings, on_step)


def _train(settings: TrainSettings, on_step: Callable[[dict], None] | None) -> TrainResult:
    s = settings
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if s.batch_size % world:
        raise TossError(f"batch_size {s.batch_size} must be divisible by the number of processes ({world})")
    out = Path(s.out)
    _check_out(s)
    say = _say(not s.quiet and rank == 0)

    model, tokenizer = load_model(s.model, dtype=s.dtype, quiet=s.quiet or rank > 0,
                                  keep_quantized=s.keep_quantized)
    data = tokenize_dataset(s.data, tokenizer, s.template, s.max_seq_len, s.format, s.skip_bad_rows)
    say(data.summary())
    train_set = KeepDataset.build(data, keep_of_mask(s.mask, data) if s.mask else None)
    if s.mask and not train_set.kept_targets.sum():
        raise TossError(f"{s.mask}: the mask removes every response token; nothing would be "
                        "trained (choose a smaller --ratio in toss-mlx select)")
    valid_set = valid = None
    if s.valid:
        valid = tokenize_dataset(s.valid, tokenizer, s.template, s.max_seq_len, s.format,
                                 s.skip_bad_rows)
        valid_set = KeepDataset.build(valid)
        say(valid.summary())

    per_epoch = steps_per_epoch(len(train_set), s.batch_size)
    total = s.iters or s.epochs * per_epoch
    total = s.grad_accum * -(-total // s.grad_accum)  # whole optimizer updates only
    record = _run_record(s, data.fingerprint, valid.fingerprint if valid else None, total)
    ckpt = _start_run(out, s, record, rank)

    mx.random.seed(s.seed)  # the LoRA init
    config = add_lora(model, s.lora)
    config["toss"] = _training_record(s, data.fingerprint, total)
    if s.mask:  # export's README shows it without reading a file outside the adapter folder
        config["toss"]["selection"] = _selection_record(s.mask)
    optimizer = make_optimizer(s, total // s.grad_accum)
    start, best = 0, (None, None)
    if s.init_adapter and ckpt is None:
        _load_init_adapter(Path(s.init_adapter), model)
    if ckpt is not None:
        start, meta = _restore(ckpt, model, optimizer)
        best = (json.loads(meta.get("best_val_loss", "null")), json.loads(meta.get("best_step", "null")))
        if start >= total and (out / "train_summary.json").exists():
            say(f"{out}: this run is finished ({total} steps); nothing to do "
                "(--overwrite starts over)")
            return _finished(out, model)
        say(f"{out}: resuming at step {start} of {total}")
    kept_share = train_set.kept_targets.sum() / max(train_set.response_targets.sum(), 1)
    say(f"training {s.model}: {len(train_set)} samples, batch {s.batch_size}"
        + (f" x {world} processes" if world > 1 else "")
        + f", {per_epoch} steps/epoch, {total} steps, kept {kept_share:.1%} of response tokens")

    # project only kept targets, if the head allows; the memory-lean body unless mlx-lm's
    # checkpointed layers are asked for
    use_kept_head(model, train_set.tokens[0], lean_body=not s.grad_checkpoint)
    loop = _TrainingCallback(s, model, optimizer, train_set, valid_set, out, config, start, total, best, on_step)
    seconds = loop.run() if start < total else 0.0
    if rank == 0:
        _check_finite_weights(model, loop.step, out)
        save_adapter(model, out, config)
    n_last = min(len(loop.losses), per_epoch)
    result = TrainResult(
        out=out, steps=loop.step, total_steps=total, epochs=loop.step / per_epoch,
        train_loss=float(np.mean(loop.losses[-n_last:])) if n_last else None,
        val_loss=loop.val_loss, best_val_loss=loop.best_val, best_step=loop.best_step,
        trained_tokens=loop.tokens,
        kept_share=loop.kept_tokens / loop.response_tokens if loop.response_tokens else None,
        seconds=seconds, tokens_per_sec=loop.tokens / seconds if seconds else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9, resumed_from=start, model=model,
    )
    if rank == 0:
        write_json(out / "train_summary.json", result.to_json())
    return result


def _finished(out: Path, model: nn.Module) -> TrainResult:
    """The result of a finished run, as its train_summary.json recorded it (left unchanged)."""
    summary = read_json(out / "train_summary.json")
    names = {f.name for f in dataclasses.fields(TrainResult)} - {"model"}
    if not isinstance(summary, dict) or not names <= set(summary):
        raise TossError(f"{out / 'train_summary.json'}: not a toss-mlx training summary; "
                        "--overwrite starts over")
    values = {k: summary[k] for k in names}
    values["out"] = Path(values["out"])
    return TrainResult(**values, model=model)
