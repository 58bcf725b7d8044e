"""Token risk scores: S = loss_utility - loss_safety for every response token.

For response token j of sample i, `loss_u` is its cross-entropy under the
utility-oriented reference model (base + utility adapter) and `loss_h` under
the safety-degraded one (base + safety adapter), each predicting token j from
tokens < j. High S: the safety-degraded model predicts the token much better
than the utility model, so the token is risky. Prompt, system and template
tokens are never scored.

Output file (`scores.safetensors`, format_version 1), one flat layout shared
with `mask.safetensors` and `TokenizedData.flat()`:

    offsets        int64   [N+1]  sample i's tokens are offsets[i]:offsets[i+1]
    row_index      int64   [N]    0-based row of the source file (JSONL: line - 1)
    token_ids      int32   [T]    the tokens the models read
    response_mask  uint8   [T]    1 = a scored response token (a sample's first
                                  token is never scored: nothing predicts it)
    loss_utility   float32 [T]    cross-entropy (nats) under base + utility adapter
    loss_safety    float32 [T]    cross-entropy (nats) under base + safety adapter
    score          float32 [T]    loss_utility - loss_safety

All three float arrays are 0 where response_mask is 0. String metadata:
dataset_sha256, tokenizer_sha256, template, max_seq_len (the data
fingerprint, copied from `TokenizedData.fingerprint`), model,
utility_adapter_sha256, safety_adapter_sha256 (see `adapter_sha256`),
format_version, and scored_tokens. Read it back with `load_scores`.

How it runs:
1. The base model is loaded once. Both adapters go onto the same LoRA layers:
   between the utility and the safety pass only the small LoRA weights are
   swapped in (adapters of different shapes fall back to re-adding layers).
2. Samples are sorted by length and packed into batches under a token budget
   (`batch_tokens` = batch size x padded length), so padding stays small; a
   sample is cut after its last response token, which is all the models need.
3. Each batch runs the transformer body once per adapter; only the positions
   that predict a response token are projected onto the vocabulary, in chunks
   (see `toss_mlx.token_loss`).
4. Finished batches are flushed to shards in `<out>.partial/` every
   FLUSH_BATCHES batches or `flush_seconds`, whichever comes first; a killed run started again with the same arguments loads
   them and computes only the rest. The final file is written atomically and
   the shards are removed.
5. Under `mlx.launch` (any backend, e.g. ring) each rank takes every
   size-th batch; the ranks' losses are summed into one output that rank 0
   writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checks import check_writable, locked, read_adapter_config
from .data import TokenizedData
from .io import TossError, load_arrays, save_arrays, sha256_bytes, sha256_file
from .models.lora import strip_adapters
from .token_loss import padding_changes_positions, pick_path, response_losses

FORMAT_VERSION = "1"
FLUSH_BATCHES = 4  # finished batches are saved as a shard every this many batches (or 30 s)
ARRAYS = {  # name -> dtype of the scores file
    "offsets": np.int64, "row_index": np.int64, "token_ids": np.int32, "response_mask": np.uint8,
    "loss_utility": np.float32, "loss_safety": np.float32, "score": np.float32,
}
FINGERPRINT_KEYS = ("dataset_sha256", "tokenizer_sha256", "template", "max_seq_len")
META_KEYS = FINGERPRINT_KEYS + ("model", "utility_adapter_sha256", "safety_adapter_sha256",
                                "format_version")
DEFAULT_BATCH_TOKENS = 4096


@dataclass
class Scores:
    """A scores file in memory: the flat arrays (see the module docstring) + string metadata."""

    offsets: np.ndarray
    row_index: np.ndarray
    token_ids: np.ndarray
    response_mask: np.ndarray
    loss_utility: np.ndarray
    loss_safety: np.ndarray
    score: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(self.row_index)

    @property
    def scored_tokens(self) -> int:
        return int(self.response_mask.sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def sample_ids(self) -> np.ndarray:
        """int64 [T]: the sample each token belongs to."""
        return np.repeat(np.arange(self.samples), np.diff(self.offsets))


# ---------------------------------------------------------------- adapters


def adapter_sha256(folder: str | os.PathLike) -> str:
    """Hash of an adapter folder: sha256 of adapter_config.json's hash + adapters.safetensors' hash."""
    p = Path(folder)
    _check_adapter_folder(p)
    return sha256_bytes(sha256_file(p / "adapter_config.json") + sha256_file(p / "adapters.safetensors"))


def _check_adapter_folder(p: Path) -> None:
    if not (p / "adapter_config.json").is_file() or not (p / "adapters.safetensors").is_file():
        raise TossError(f"{p}: not an adapter folder (needs adapter_config.json and adapters.safetensors)")
    read_adapter_config(p)  # wrong types (num_layers "abc", scale "nan") fail here, in one line


class AdapterSwitch:
    """One base model, several adapters: swap the small LoRA weights instead of the model.

    When every adapter has the same LoRA structure (type, layers, rank, target
    modules), the LoRA layers are added once and `use(i)` only loads adapter
    i's weights and scale. Otherwise `use(i)` removes the LoRA layers and adds
    adapter i's. `close()` leaves the bare base model.
    """

    def __init__(self, model: nn.Module, folders: list[str | os.PathLike]):
        self.model = model
        self.folders = [Path(f) for f in folders]
        self.configs, self.weights = [], []
        for p in self.folders:
            _check_adapter_folder(p)
            try:
                config = json.loads((p / "adapter_config.json").read_text())
                weights = mx.load(str(p / "adapters.safetensors"))
            except (json.JSONDecodeError, OSError, RuntimeError, ValueError) as e:
                raise TossError(f"{p}: unreadable adapter ({e})") from None
            if config.get("fine_tune_type", "lora") == "full":
                raise TossError(f"{p}: a full fine-tune checkpoint, not a LoRA/DoRA adapter")
            self.configs.append(config)
            self.weights.append(weights)
        self.shared = len({self._structure(c, w) for c, w in zip(self.configs, self.weights, strict=True)}) == 1
        self.current: int | None = None
        strip_adapters(model)

    @staticmethod
    def _structure(config: dict, weights: dict) -> str:
        params = dict(config.get("lora_parameters", {}))
        params.pop("scale", None)
        params.pop("dropout", None)
        shapes = sorted((k, tuple(v.shape)) for k, v in weights.items())
        return json.dumps([config.get("fine_tune_type", "lora"), config.get("num_layers"), params,
                           shapes], sort_keys=True, default=str)

    def use(self, i: int) -> None:
        if self.current == i:
            return
        from .models.load import apply_adapter

        if self.shared and self.current is not None:
            self.model.load_weights(list(self.weights[i].items()), strict=False)
            scale = self.configs[i].get("lora_parameters", {}).get("scale")
            if scale is not None:
                for _, module in self.model.named_modules():
                    if "lora_a" in module and hasattr(module, "scale"):
                        module.scale = scale
        else:
            strip_adapters(self.model)
            apply_adapter(self.model, self.folders[i])
        self.model.eval()
        self.current = i

    def close(self) -> None:
        strip_adapters(self.model)
        self.current = None


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    index: int
    samples: np.ndarray  # sample ids, longest first
    length: int  # padded input length


def scored_mask(flat: dict[str, np.ndarray]) -> np.ndarray:
    """bool [T]: response tokens that can be scored (not the first token of a sample)."""
    mask = flat["response_mask"].astype(bool).copy()
    starts = flat["offsets"][:-1]
    mask[starts[starts < len(mask)]] = False
    return mask


def input_lengths(flat: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """int64 [N]: tokens each sample must feed the model (up to its last scored token, exclusive)."""
    offsets = flat["offsets"]
    n = len(offsets) - 1
    lengths = np.zeros(n, np.int64)
    pos = np.nonzero(mask)[0]
    if len(pos):
        sample = np.searchsorted(offsets, pos, side="right") - 1
        np.maximum.at(lengths, sample, pos - offsets[sample])
    return lengths


def plan_batches(lengths: np.ndarray, batch_tokens: int, same_length: bool = False) -> list[Batch]:
    """Pack samples (longest first) into batches of at most `batch_tokens` padded tokens.

    Deterministic for given lengths and budget, so a resumed run plans the
    same batches. Samples with nothing to score (length 0) are left out; a
    sample longer than the budget gets a batch of its own. `same_length`:
    no padding at all, for models whose positions depend on the length.
    """
    if batch_tokens < 1:
        raise TossError(f"batch_tokens must be at least 1, got {batch_tokens}")
    order = [int(i) for i in np.lexsort((np.arange(len(lengths)), -lengths)) if lengths[i] > 0]
    batches: list[Batch] = []
    k = 0
    while k < len(order):
        longest = int(lengths[order[k]])
        size = max(1, min(len(order) - k, batch_tokens // longest))
        if same_length:
            size = max(1, int(np.sum(lengths[order[k:k + size]] == longest)))
        batches.append(Batch(len(batches), np.array(order[k:k + size], np.int64), longest))
        k += size
    return batches


def batch_arrays(flat: dict[str, np.ndarray], mask: np.ndarray, batch: Batch
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [B, L] int32, rows [R], targets [R] int32, token positions [R] in the flat layout)."""
    offsets, tokens = flat["offsets"], flat["token_ids"]
    L = batch.length
    inputs = np.zeros((len(batch.samples), L), np.int32)
    rows, positions = [], []
    for b, s in enumerate(batch.samples):
        start, stop = int(offsets[s]), int(offsets[s + 1])
        n = min(L, stop - start)
        inputs[b, :n] = tokens[start:start + n]
        j = np.nonzero(mask[start:stop])[0]  # j >= 1, j <= L
        rows.append(b * L + j - 1)
        positions.append(start + j)
    positions = np.concatenate(positions).astype(np.int64)
    return inputs, np.concatenate(rows).astype(np.int64), tokens[positions].astype(np.int32), positions


# ---------------------------------------------------------------- resume shards


class ShardStore:
    """Finished batches on disk: `shard-<rank>-<seq>.safetensors` files in a work folder.

    Each shard holds the losses of a few batches and the run key (a hash of
    everything that decides the result); shards of another run are ignored
    and removed. Every shard is written atomically.
    """

    def __init__(self, folder: Path | None, run_key: str, rank: int):
        self.folder, self.run_key, self.rank = folder, run_key, rank
        self.pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self.seq = 0

    def load(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Finished batches: batch index -> (positions, loss_utility, loss_safety)."""
        done: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if self.folder is None or not self.folder.is_dir():
            return done
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                arrays, meta = load_arrays(path, "shard")
            except (TossError, FileNotFoundError):
                continue  # removed by another rank or unreadable: recompute its batches
            if meta.get("run_key") != self.run_key:
                if self.rank == 0:
                    path.unlink(missing_ok=True)
                continue
            ends = np.cumsum(arrays["batch_sizes"])
            for b, stop, size in zip(arrays["batch_ids"], ends, arrays["batch_sizes"], strict=True):
                sl = slice(int(stop - size), int(stop))
                done[int(b)] = (arrays["positions"][sl], arrays["loss_utility"][sl],
                                arrays["loss_safety"][sl])
        return done

    def add(self, batch: int, positions: np.ndarray, loss_u: np.ndarray, loss_h: np.ndarray) -> None:
        self.pending.append((batch, positions, loss_u, loss_h))

    def flush(self) -> None:
        if self.folder is None or not self.pending:
            self.pending = []
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            path = self.folder / f"shard-{self.rank:03d}-{self.seq:06d}.safetensors"
            self.seq += 1
            if not path.exists():
                break
        save_arrays(path, {
            "batch_ids": np.array([p[0] for p in self.pending], np.int64),
            "batch_sizes": np.array([len(p[1]) for p in self.pending], np.int64),
            "positions": np.concatenate([p[1] for p in self.pending]),
            "loss_utility": np.concatenate([p[2] for p in self.pending]),
            "loss_safety": np.concatenate([p[3] for p in self.pending]),
        }, {"run_key": self.run_key})
        self.pending = []

    def remove(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.glob("shard-*.safetensors"):
                path.unlink(missing_ok=True)
            for path in self.folder.glob(".shard-*.tmp"):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar (rows, scored tokens/s, peak memory, ETA), or nothing in quiet mode.

    The bar advances by padded tokens, the work a batch costs, so the ETA holds
    although the longest samples come first.
    """

    def __init__(self, enabled: bool, batches: list[Batch], done: set[int]):
        self.bar = None
        self.start = time.perf_counter()
        self.tokens = 0
        self.rows = sum(len(b.samples) for b in batches if b.index in done)
        self.total_rows = sum(len(b.samples) for b in batches)
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]scoring"), BarColumn(), TextColumn("{task.fields[rows]} rows"),
            TextColumn("{task.fields[speed]} tok/s"), TextColumn("{task.fields[memory]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "score", total=sum(len(b.samples) * b.length for b in batches),
            completed=sum(len(b.samples) * b.length for b in batches if b.index in done),
            rows=f"{self.rows}/{self.total_rows}", speed="-", memory="")

    def advance(self, batch: Batch, tokens: int) -> None:
        self.tokens += tokens
        self.rows += len(batch.samples)
        if self.bar is None:
            return
        speed = self.tokens / max(1e-9, time.perf_counter() - self.start)
        self.bar.update(self.task, advance=len(batch.samples) * batch.length,
                        rows=f"{self.rows}/{self.total_rows}", speed=f"{speed:,.0f}",
                        memory=f"{mx.get_peak_memory() / 2**30:.1f} GB peak")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------- scoring


def _distributed_group(group):
    if group is not None:
        return group
    try:
        return mx.distributed.init()
    except Exception:  # no backend configured: one process
        return None


def run_key(fingerprint: dict[str, Any], model: str, utility_sha: str, safety_sha: str,
            batch_tokens: int, samples: int) -> str:
    return sha256_bytes(json.dumps({
        "format_version": FORMAT_VERSION, "fingerprint": {k: str(fingerprint.get(k)) for k in FINGERPRINT_KEYS},
        "model": model, "utility": utility_sha, "safety": safety_sha, "batch_tokens": int(batch_tokens),
        "samples": int(samples)}, sort_keys=True))


def score_tokens(model: nn.Module, data: TokenizedData, utility: str | os.PathLike,
                 safety: str | os.PathLike, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 model_name: str = "", work_dir: str | os.PathLike | None = None,
                 flush_seconds: float = 30.0, progress: bool = False, group=None,
                 path: str | None = None) -> Scores:
    """Score every response token of `data` with a loaded base model and two adapter folders.

    `model` is the bare base model (LoRA layers already on it are removed
    first and again at the end, so it comes back bare). `work_dir` enables
    resuming: finished batches are flushed there every `flush_seconds` and
    loaded on the next call with the same inputs. Under `mlx.launch` the
    batches are shared among the ranks of `group` (default: the launched
    group) and every rank returns the full result. `path` forces a compute
    path of `toss_mlx.token_loss` (tests); by default the fastest that
    matches the model's own logits is taken.
    """
    group = _distributed_group(group)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    flat = data.flat()
    mask = scored_mask(flat)
    lengths = input_lengths(flat, mask)
    hashes = adapter_sha256(utility), adapter_sha256(safety)
    key = run_key(data.fingerprint, model_name, *hashes, batch_tokens, len(lengths))
    full = np.where(lengths > 0, np.diff(flat["offsets"]), 0)
    same_length = bool(lengths.any()) and padding_changes_positions(
        model, int(lengths[lengths > 0].min()), int(full.max()))
    if same_length:  # positions depend on the length: whole samples, never padded
        lengths = full
    batches = plan_batches(lengths, batch_tokens, same_length)
    mine = [b for b in batches if b.index % size == rank]

    store = ShardStore(Path(work_dir) if work_dir is not None else None, key, rank)
    done = store.load()
    T = len(flat["token_ids"])
    loss_u = np.zeros(T, np.float32)
    loss_h = np.zeros(T, np.float32)
    todo = []
    for b in mine:
        if b.index in done:
            positions, lu, lh = done[b.index]
            loss_u[positions], loss_h[positions] = lu, lh
        else:
            todo.append(b)

    if done and progress and rank == 0:
        already = sum(len(b.samples) for b in batches if b.index in done)
        print(f"resuming: {already} of {len(lengths)} samples already scored")
    switch = AdapterSwitch(model, [utility, safety])
    bar = _Progress(progress and rank == 0, mine, set(done))
    try:
        last_flush = time.perf_counter()
        chosen = path
        for k, b in enumerate(todo):
            inputs, rows, targets, positions = batch_arrays(flat, mask, b)
            losses = [None, None]
            for i in ((0, 1) if k % 2 == 0 else (1, 0)):  # one adapter switch per batch
                switch.use(i)
                if chosen is None:
                    chosen = pick_path(model, inputs[0])
                losses[i] = response_losses(model, inputs, rows, targets, chosen)
            loss_u[positions], loss_h[positions] = losses
            store.add(b.index, positions, *losses)
            if (time.perf_counter() - last_flush >= flush_seconds
                    or len(store.pending) >= FLUSH_BATCHES):  # by work done, too: a kill loses little
                store.flush()
                last_flush = time.perf_counter()
            bar.advance(b, len(positions))
        store.flush()
    finally:
        bar.close()
        store.flush()
        switch.close()

    if size > 1:
        loss_u = np.array(mx.distributed.all_sum(mx.array(loss_u), group=group, stream=mx.cpu))
        loss_h = np.array(mx.distributed.all_sum(mx.array(loss_h), group=group, stream=mx.cpu))

    meta = {**{k: str(data.fingerprint[k]) for k in FINGERPRINT_KEYS}, "model": model_name,
            "utility_adapter_sha256": hashes[0], "safety_adapter_sha256": hashes[1],
            "format_version": FORMAT_VERSION, "scored_tokens": str(int(mask.sum()))}
    score = np.where(mask, loss_u - loss_h, 0).astype(np.float32)
    return Scores(flat["offsets"], flat["row_index"], flat["token_ids"], mask.astype(np.uint8),
                  loss_u, loss_h, score, meta)


def score_dataset(model: str | nn.Module, utility: str | os.PathLike, safety: str | os.PathLike,
                  data: str | os.PathLike | TokenizedData, out: str | os.PathLike, *,
                  tokenizer=None, template: str = "chat", max_seq_len: int = 2048,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS, model_name: str | None = None,
                  fmt: str = "auto", skip_bad_rows: bool = False, quiet: bool = False,
                  flush_seconds: float = 30.0, group=None) -> Scores:
    """Load (or take) the base model, tokenize the data, score it and write `out` atomically.

    `model` is a model spec (registry name, folder, hub id) or an already loaded
    model (then pass `tokenizer` too, unless `data` is already tokenized).
    Partial results live in `<out>.partial/` until the run finishes; rerunning
    the same command after a kill resumes from them.
    """
    from .data import tokenize_dataset

    for p in (utility, safety):
        _check_adapter_folder(Path(p))
    check_writable(out, "scores file")  # before the compute, not after it
    if isinstance(model, str):
        from .models.load import load_model

        model_name = model_name or model
        model, tokenizer = load_model(model, quiet=quiet)
    if not isinstance(data, TokenizedData):
        if tokenizer is None:
            raise TossError("score_dataset: pass the tokenizer with an already loaded model")
        data = tokenize_dataset(data, tokenizer, template=template, max_seq_len=max_seq_len,
                                fmt=fmt, skip_bad_rows=skip_bad_rows)
    group = _distributed_group(group)
    rank = group.rank() if group is not None else 0
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    if not quiet and rank == 0:
        print(data.summary())
    scores = score_tokens(model, data, utility, safety, batch_tokens=batch_tokens,
                          model_name=model_name or "", work_dir=work, flush_seconds=flush_seconds,
                          progress=not quiet, group=group)
    if rank == 0:
        save_arrays(out, scores.arrays(), scores.meta)
        ShardStore(work, "", 0).remove()
    if group is not None and group.size() > 1:  # nobody returns before the file exists
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group, stream=mx.cpu))
    return scores


@dataclass
class ScoreSettings:
    """Everything `toss-mlx score` takes (the CLI, the pipeline and TOSS-Pro build one of these)."""

    model: str
    utility: str
    safety: str
    data: str
    out: str = "scores.safetensors"
    template: str = "chat"
    max_seq_len: int = 2048
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    fmt: str = "auto"
    skip_bad_rows: bool = False
    quiet: bool = False
    flush_seconds: float = 30.0


def score(s: ScoreSettings, model: nn.Module | None = None, tokenizer=None) -> Scores:
    """Run `score_dataset` from settings; pass a loaded `model` and `tokenizer` to reuse them.

    The output is locked meanwhile: a second process scoring into it gets an error."""
    check_writable(s.out, "scores file")
    with locked(s.out, folder=False):
        return score_dataset(model if model is not None else s.model, s.utility, s.safety, s.data,
                             s.out, tokenizer=tokenizer, template=s.template,
                             max_seq_len=s.max_seq_len, batch_tokens=s.batch_tokens,
                             model_name=s.model, fmt=s.fmt, skip_bad_rows=s.skip_bad_rows,
                             quiet=s.quiet, flush_seconds=s.flush_seconds)


# ---------------------------------------------------------------- reading


def load_scores(path: str | os.PathLike) -> Scores:
    """Read and check a scores file: every array present with its dtype and consistent shapes."""
    arrays, meta = load_arrays(path, "scores file")
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise TossError(f"{path}: not a scores file (missing arrays: {', '.join(missing)})")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise TossError(f"{path}: scores file without metadata {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise TossError(f"{path}: scores format_version {meta['format_version']}, "
                        f"this toss-mlx reads {FORMAT_VERSION}")
    for k, dt in ARRAYS.items():
        if arrays[k].dtype != dt or arrays[k].ndim != 1:
            raise TossError(f"{path}: array {k} is {arrays[k].dtype} {arrays[k].shape}, expected 1-D {np.dtype(dt)}")
    offsets = arrays["offsets"]
    T = len(arrays["token_ids"])
    bad = (len(offsets) != len(arrays["row_index"]) + 1 or offsets[0] != 0 or offsets[-1] != T
           or np.any(np.diff(offsets) < 0)
           or any(len(arrays[k]) != T for k in ("response_mask", "loss_utility", "loss_safety", "score")))
    if bad:
        raise TossError(f"{path}: corrupt scores file (offsets and array lengths disagree)")
    scored = arrays["response_mask"].astype(bool)
    for k in ("loss_utility", "loss_safety", "score"):
        if not np.all(np.isfinite(arrays[k][scored])):
            raise TossError(f"{path}: {k} has NaN or infinite values on response tokens")
    return Scores(**{k: arrays[k] for k in ARRAYS}, meta=meta)


def summary(scores: Scores) -> str:
    """One line about a scores file, for the end of `toss-mlx score`."""
    s = scores.score[scores.response_mask.astype(bool)]
    if len(s) == 0:
        return f"{scores.samples} samples, no scored tokens"
    q = np.quantile(s, [0.5, 0.9, 0.99])
    return (f"{scores.samples} samples, {len(s)} response tokens scored; "
            f"score mean {s.mean():.3f}, median {q[0]:.3f}, p90 {q[1]:.3f}, p99 {q[2]:.3f}, "
            f"max {s.max():.3f}; mean loss utility {scores.loss_utility[scores.response_mask == 1].mean():.3f}, "
            f"safety {scores.loss_safety[scores.response_mask == 1].mean():.3f}")


def floor_share(ratio: float, total: int) -> int:
    """floor(ratio x total) in decimal arithmetic (0.29 x 100 = 29, not 28.999...)."""
    from fractions import Fraction

    return math.floor(Fraction(repr(float(ratio))) * total)
