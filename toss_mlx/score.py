"""Token risk scores: S = loss_utility - loss_safety for every response token.

For response token j of sample i, `loss_utility` is its cross-entropy under the
utility-oriented reference model (base + utility adapter) and `loss_safety` under
the safety-degraded one (base + safety adapter), each predicting token j from
tokens < j. High S: the safety-degraded model predicts the token much better
than the utility model, so the token is risky. Prompt, system and template
tokens are never scored.

Output file: `scores.safetensors`, the flat layout described in README.md ("Files"),
read and checked by `toss_mlx.layout.load_scores`. Beyond the README's metadata it
records `scored_tokens`, `score_path` and `score_path_reason` (the compute path of
`toss_mlx.token_loss` and why it was chosen), and `utility_losses_from` when
`ScoreSettings.reuse_utility` supplied loss_utility. A sample's first token is never scored: nothing predicts it.

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

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import adapter_fingerprint, cache_key
from .checks import check_writable, locked, read_adapter_config
from .data import TokenizedData
from .io import TossError, load_arrays, save_arrays
from .layout import FINGERPRINT_KEYS, FORMAT_VERSION, Scores
from .models.load import describe_compute
from .models.lora import AdapterSet
from .progress import Progress
from .token_loss import (
    batch_arrays,
    input_lengths,
    pick_path,
    plan_for,
    response_losses,
    scored_mask,
)

DEFAULT_BATCH_TOKENS = 4096
FLUSH_BATCHES = 4  # finished batches are saved as a shard every this many batches (or 30 s)


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

    def add(self, batch: int, positions: np.ndarray, loss_utility: np.ndarray, loss_safety: np.ndarray) -> None:
        self.pending.append((batch, positions, loss_utility, loss_safety))

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


# ---------------------------------------------------------------- settings


@dataclass
class ScoreSettings:
    """Everything scoring takes: the one way options reach `score` and `score_tokens`.

    `reuse_utility`: the path of an earlier scores file of the same data, tokenizer,
    template, max length, model and utility adapter (TOSS-Pro's rounds: the utility
    model never changes). Its `loss_utility` is copied and only the safety side is
    computed; a file made from other inputs is refused.
    """

    model: str = ""
    utility: str = ""
    safety: str = ""
    data: str = ""
    out: str = "scores.safetensors"
    template: str = "chat"
    max_seq_len: int = 2048
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    fmt: str = "auto"
    skip_bad_rows: bool = False
    quiet: bool = False
    flush_seconds: float = 30.0
    reuse_utility: str | None = None
    dtype: str | None = None  # float32, bfloat16, float16; default: the device's (models.load)
    keep_quantized: bool = False  # a quantized base stays quantized on any device


# ---------------------------------------------------------------- scoring


def distributed_group(group=None):
    """The group of ranks under `mlx.launch` (or `group` itself), None for one process."""
    if group is not None:
        return group
    try:
        return mx.distributed.init()
    except Exception:  # no backend configured: one process
        return None


def run_key(s: ScoreSettings, fingerprint: dict[str, Any], adapters: tuple[str, str], samples: int,
            path: str, compute: str = "") -> str:
    """The key of a run's shards: everything that decides its losses (`cache.cache_key`);
    `compute` is the loaded model's dtype and quantization (`models.load.describe_compute`)."""
    return cache_key({"scores_format": FORMAT_VERSION, "model": s.model, "compute": compute,
                      "fingerprint": {k: str(fingerprint.get(k)) for k in FINGERPRINT_KEYS},
                      "utility": adapters[0], "safety": adapters[1],
                      "batch_tokens": int(s.batch_tokens), "samples": int(samples), "path": path,
                      "reuse_utility": Path(s.reuse_utility) if s.reuse_utility else None})


def reusable_utility(path: str | os.PathLike, data: TokenizedData, model: str, utility_sha: str,
                     mask: np.ndarray, compute: str | None = None) -> Scores:
    """An earlier scores file whose loss_utility holds for this data, model and utility adapter.

    Its fingerprint (dataset, tokenizer, template, max length, model, utility adapter,
    format version, and the compute dtype/quantization when `compute` is given) and its
    tokens must be this run's; anything else is a clear error.
    """
    from .layout import load_scores

    earlier = load_scores(path)
    want = {**{k: str(data.fingerprint[k]) for k in FINGERPRINT_KEYS}, "model": model,
            "utility_adapter_sha256": utility_sha, "format_version": FORMAT_VERSION,
            **({"compute": compute} if compute is not None else {})}
    problems = [f"{k}: it has {str(earlier.meta.get(k))[:16]}, this run {v[:16]}"
                for k, v in want.items() if earlier.meta.get(k) != v]
    flat = data.flat()
    if not problems and not (np.array_equal(earlier.offsets, flat["offsets"])
                             and np.array_equal(earlier.token_ids, flat["token_ids"])
                             and np.array_equal(earlier.response_mask.astype(bool), mask)):
        problems.append("its tokens differ from this run's")
    if problems:
        raise TossError(f"{path}: cannot reuse its loss_utility, it was made from other inputs:\n  "
                        + "\n  ".join(problems))
    return earlier


def score_tokens(model: nn.Module, data: TokenizedData, s: ScoreSettings, *,
                 work_dir: str | os.PathLike | None = None, group=None,
                 path: str | None = None) -> Scores:
    """Score every response token of `data` with a loaded base model and the adapters of `s`.

    `model` is the bare base model (LoRA layers already on it are removed
    first and again at the end, so it comes back bare). `work_dir` enables
    resuming: finished batches are flushed there every `s.flush_seconds` and
    loaded on the next call with the same inputs. Under `mlx.launch` the
    batches are shared among the ranks of `group` (default: the launched
    group) and every rank returns the full result. `path` forces a compute
    path of `toss_mlx.token_loss` (tests); by default the fastest that
    matches the model's own logits is taken (printed unless quiet, and recorded
    in the metadata as `score_path` and `score_path_reason`).
    """
    group = distributed_group(group)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    say = print if not s.quiet and rank == 0 else (lambda *a: None)
    flat = data.flat()
    mask = scored_mask(flat)
    lengths = input_lengths(flat, mask)
    hashes = adapter_fingerprint(s.utility), adapter_fingerprint(s.safety)
    compute = describe_compute(model)
    reused = reusable_utility(s.reuse_utility, data, s.model, hashes[0], mask, compute) \
        if s.reuse_utility else None
    batches = plan_for(model, flat, mask, s.batch_tokens)
    mine = [b for b in batches if b.index % size == rank]

    # Adapter 0 = utility, 1 = safety; with reused utility losses only the safety adapter runs.
    switch = AdapterSet(model, [s.utility, s.safety])
    sides = (1,) if reused is not None else (0, 1)
    if path is not None:
        chosen, reason = path, "forced by the caller"
    elif lengths.any():  # probed on the bare base, so that every run of this model agrees
        chosen, reason = pick_path(model, [flat["token_ids"][flat["offsets"][b.samples[0]]:
                                                             flat["offsets"][b.samples[0] + 1]]
                                           for b in batches[:2]])
    else:
        chosen, reason = "none", "nothing to score"
    key = run_key(s, data.fingerprint, hashes, len(lengths), chosen, compute)
    store = ShardStore(Path(work_dir) if work_dir is not None else None, key, rank)
    done = store.load()
    T = len(flat["token_ids"])
    loss_utility = np.zeros(T, np.float32)
    loss_safety = np.zeros(T, np.float32)
    todo = []
    for b in mine:
        if b.index in done:
            positions, lu, lh = done[b.index]
            loss_utility[positions], loss_safety[positions] = lu, lh
        else:
            todo.append(b)

    if done:
        already = sum(len(b.samples) for b in batches if b.index in done)
        say(f"resuming: {already} of {len(lengths)} samples already scored")
    say(f"scoring path: {chosen}, {compute} ({reason})" + ("; utility losses reused from "
                                                 f"{s.reuse_utility}" if reused is not None else ""))
    # The bar advances by padded tokens, the work a batch costs, so the ETA holds
    # although the longest samples come first.
    bar = Progress(not s.quiet and rank == 0).start()
    rows_done = sum(len(b.samples) for b in mine if b.index in done)
    total_rows = sum(len(b.samples) for b in mine)
    task = bar.task("scoring", total=sum(len(b.samples) * b.length for b in mine),
                    completed=sum(len(b.samples) * b.length for b in mine if b.index in done),
                    rows=f"{rows_done}/{total_rows}")
    try:
        last_flush = time.perf_counter()
        for k, b in enumerate(todo):
            inputs, rows, targets, positions = batch_arrays(flat, mask, b)
            for i in (sides if k % 2 == 0 else sides[::-1]):  # one adapter switch per batch
                switch.use(i)
                losses = response_losses(model, inputs, rows, targets, chosen)
                (loss_utility if i == 0 else loss_safety)[positions] = losses
            if reused is not None:
                loss_utility[positions] = reused.loss_utility[positions]
            store.add(b.index, positions, loss_utility[positions], loss_safety[positions])
            if (time.perf_counter() - last_flush >= s.flush_seconds
                    or len(store.pending) >= FLUSH_BATCHES):  # by work done, too: a kill loses little
                store.flush()
                last_flush = time.perf_counter()
            rows_done += len(b.samples)
            task.advance(len(b.samples) * b.length, tokens=len(positions) * len(sides),
                         rows=f"{rows_done}/{total_rows}")
        store.flush()
    finally:
        bar.close()
        store.flush()
        switch.close()

    if size > 1:
        loss_utility = np.array(mx.distributed.all_sum(mx.array(loss_utility), group=group, stream=mx.cpu))
        loss_safety = np.array(mx.distributed.all_sum(mx.array(loss_safety), group=group, stream=mx.cpu))

    meta = {**{k: str(data.fingerprint[k]) for k in FINGERPRINT_KEYS}, "model": s.model,
            "utility_adapter_sha256": hashes[0], "safety_adapter_sha256": hashes[1],
            "format_version": FORMAT_VERSION, "scored_tokens": str(int(mask.sum())),
            "score_path": chosen, "score_path_reason": reason, "compute": compute}
    if reused is not None:
        meta["utility_losses_from"] = str(s.reuse_utility)
    score = np.where(mask, loss_utility - loss_safety, 0).astype(np.float32)
    return Scores(flat["offsets"], flat["row_index"], flat["token_ids"], mask.astype(np.uint8),
                  loss_utility, loss_safety, score, meta)


def score(s: ScoreSettings, model: nn.Module | None = None, tokenizer=None,
          data: TokenizedData | None = None, group=None) -> Scores:
    """Load (or take) the base model, tokenize `s.data`, score it and write `s.out` atomically.

    Pass a loaded `model` with its `tokenizer` (or the already tokenized `data`) to
    reuse them. Partial results live in `<out>.partial/` until the run finishes;
    rerunning the same settings after a kill resumes from them.
    """
    for p in (s.utility, s.safety):
        adapter_fingerprint(p)  # a clear error before the model loads if either is no adapter
        read_adapter_config(p)  # wrong types (num_layers "abc", scale "nan") fail here, in one line
    check_writable(s.out, "scores file")  # before the compute, not after it
    with locked(s.out, folder=False):  # a second process scoring into the same file gets an error
        return _score(s, model, tokenizer, data, group)


def _score(s: ScoreSettings, model: nn.Module | None, tokenizer, data: TokenizedData | None,
           group) -> Scores:
    from .data import tokenize_dataset

    if model is None:
        from .models.load import load_model

        model, tokenizer = load_model(s.model, quiet=s.quiet, dtype=s.dtype,
                                      keep_quantized=s.keep_quantized)
    if data is None:
        if tokenizer is None:
            raise TossError("score: pass the tokenizer with an already loaded model")
        data = tokenize_dataset(s.data, tokenizer, template=s.template, max_seq_len=s.max_seq_len,
                                fmt=s.fmt, skip_bad_rows=s.skip_bad_rows)
    group = distributed_group(group)
    rank = group.rank() if group is not None else 0
    out = Path(s.out)
    work = out.with_name(out.name + ".partial")
    if not s.quiet and rank == 0:
        print(data.summary())
    scores = score_tokens(model, data, s, work_dir=work, group=group)
    if rank == 0:
        save_arrays(out, scores.arrays(), scores.meta)
        ShardStore(work, "", 0).remove()
    if group is not None and group.size() > 1:  # nobody returns before the file exists
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group, stream=mx.cpu))
    return scores


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
