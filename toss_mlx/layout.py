"""The flat per-token layout of scores and mask files: reading, checking, and the counts over it.

The arrays and their metadata are described once, in README.md ("Files":
`scores.safetensors` and `mask.safetensors`). This module is the one place that:
- reads and checks them: `load_scores` -> `Scores`, `load_mask` -> `Mask` (checked
  against the samples and the data fingerprint they must belong to);
- says where a token sits in its answer: `answer_positions`, `answer_ends`, and counts removal by
  position (`removal_by_position` over `SUMMARY_BUCKETS` or `CHART_BUCKETS`);
- counts removal by a grouping of rows (`removal_by_group`) and, from that, the
  detector's precision and recall (`detector_figures`);
- computes exact shares: `floor_share`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from .io import TossError, load_arrays

FORMAT_VERSION = "1"  # of the scores file
SCORE_ARRAYS = {  # name -> dtype of the scores file
    "offsets": np.int64, "row_index": np.int64, "token_ids": np.int32, "response_mask": np.uint8,
    "loss_utility": np.float32, "loss_safety": np.float32, "score": np.float32,
}
MASK_ARRAYS = ("offsets", "row_index", "keep")
FINGERPRINT_KEYS = ("dataset_sha256", "tokenizer_sha256", "template", "max_seq_len")
META_KEYS = FINGERPRINT_KEYS + ("model", "utility_adapter_sha256", "safety_adapter_sha256",
                                "format_version")

# Position buckets, 1-based and inclusive (None: no upper end): the selection summary's three,
# and the report chart's finer ones.
SUMMARY_BUCKETS = (("first 5", 1, 5), ("6-20", 6, 20), ("rest", 21, None))
CHART_BUCKETS = tuple((str(lo) if lo == hi else (f"{lo}-{hi}" if hi else f"{lo}+"), lo, hi)
                      for lo, hi in ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20),
                                     (21, 50), (51, 100), (101, 200), (201, None)))


@dataclass
class Scores:
    """A scores file in memory: the flat arrays + string metadata (README, "Files")."""

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
        return {name: getattr(self, name) for name in SCORE_ARRAYS}

    def sample_ids(self) -> np.ndarray:
        """int64 [T]: the sample each token belongs to."""
        return np.repeat(np.arange(self.samples), np.diff(self.offsets))


@dataclass
class Mask:
    """A mask file in memory: which response tokens stay in the loss."""

    offsets: np.ndarray
    row_index: np.ndarray
    keep: np.ndarray  # bool [T]
    meta: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- reading and checking


def check_offsets(path: str | os.PathLike, arrays: dict[str, np.ndarray], per_token: tuple[str, ...],
                  what: str) -> None:
    """`offsets` must partition the tokens of every per-token array, one sample per row."""
    offsets = arrays["offsets"]
    total = len(arrays[per_token[0]])
    if (offsets.ndim != 1 or len(offsets) != len(arrays["row_index"]) + 1 or offsets[0] != 0
            or offsets[-1] != total or np.any(np.diff(offsets) < 0)):
        raise TossError(f"{path}: corrupt {what}: offsets do not partition its {total} tokens")
    for k in per_token:
        if len(arrays[k]) != total:
            raise TossError(f"{path}: corrupt {what}: '{k}' has {len(arrays[k])} entries, "
                            f"expected {total}")


def load_scores(path: str | os.PathLike) -> Scores:
    """Read and check a scores file: every array present with its dtype and consistent shapes."""
    arrays, meta = load_arrays(path, "scores file")
    missing = [k for k in SCORE_ARRAYS if k not in arrays]
    if missing:
        raise TossError(f"{path}: not a scores file (missing arrays: {', '.join(missing)})")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise TossError(f"{path}: scores file without metadata {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise TossError(f"{path}: scores format_version {meta['format_version']}, "
                        f"this toss-mlx reads {FORMAT_VERSION}")
    for k, dt in SCORE_ARRAYS.items():
        if arrays[k].dtype != dt or arrays[k].ndim != 1:
            raise TossError(f"{path}: array {k} is {arrays[k].dtype} {arrays[k].shape}, "
                            f"expected 1-D {np.dtype(dt)}")
    check_offsets(path, arrays, ("token_ids", "response_mask", "loss_utility", "loss_safety",
                                 "score"), "scores file")
    scored = arrays["response_mask"].astype(bool)
    for k in ("loss_utility", "loss_safety", "score"):
        if not np.all(np.isfinite(arrays[k][scored])):
            raise TossError(f"{path}: {k} has NaN or infinite values on response tokens")
    return Scores(**{k: arrays[k] for k in SCORE_ARRAYS}, meta=meta)


def load_mask(path: str | os.PathLike, offsets: np.ndarray, row_index: np.ndarray,
              fingerprint: Mapping[str, Any] | None, against: str) -> Mask:
    """Read a mask file made for the samples `offsets`/`row_index` (those of `against`).

    Refused with a clear message when the file is missing or unreadable, when it was
    made for another data fingerprint (`fingerprint`: dataset, tokenizer, template,
    max length; None skips that check), or when its rows or offsets differ.
    """
    from .data import check_fingerprint

    arrays, meta = load_arrays(path, "mask file")
    missing = [k for k in MASK_ARRAYS if k not in arrays]
    if missing:
        raise TossError(f"{path}: not a mask file: missing arrays {', '.join(missing)}")
    if fingerprint is not None:
        check_fingerprint(dict(fingerprint), meta, f"mask file {path}")
    check_offsets(path, arrays, ("keep",), "mask file")
    rows = arrays["row_index"]
    if len(rows) != len(row_index) or not np.array_equal(rows, row_index):
        raise TossError(f"{path}: the mask covers rows other than those of {against} (other "
                        f"samples: {len(rows)} vs {len(row_index)}); remake it with `toss-mlx select`")
    if not np.array_equal(arrays["offsets"], offsets):
        raise TossError(f"{path}: the mask's token offsets differ from {against}; "
                        "remake it with `toss-mlx select`")
    return Mask(arrays["offsets"], rows, arrays["keep"].astype(bool), meta)


# ---------------------------------------------------------------- positions


def answer_positions(offsets: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """int64 [T]: each response token's 0-based position in its assistant turn (-1 elsewhere).

    A turn is a run of consecutive response tokens within one sample (it never continues
    into the next sample, even without a prompt between).
    """
    scored = response_mask.astype(bool)
    T = len(scored)
    idx = np.arange(T)
    sample_start = np.zeros(T, bool)
    sample_start[offsets[:-1][offsets[:-1] < T]] = True
    prev = np.concatenate([[False], scored[:-1]])
    starts = scored & (~prev | sample_start)
    run_start = np.maximum.accumulate(np.where(starts, idx, 0))
    return np.where(scored, idx - run_start, -1)


def answer_ends(offsets: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """bool [T]: the last token of each assistant turn (the end-of-turn / eos token the chat
    template closes an answer with, when the data renders one), turns as in `answer_positions`."""
    scored = response_mask.astype(bool)
    T = len(scored)
    sample_end = np.zeros(T, bool)
    ends = offsets[1:] - 1
    sample_end[ends[(ends >= 0) & (ends < T)]] = True
    nxt = np.concatenate([scored[1:], [False]])
    return scored & (~nxt | sample_end)


def removal_by_position(offsets: np.ndarray, response_mask: np.ndarray, removed: np.ndarray,
                        buckets=SUMMARY_BUCKETS) -> list[tuple[str, int, int]]:
    """(bucket label, removed, response tokens) for every bucket of 1-based answer positions."""
    pos = answer_positions(offsets, response_mask) + 1  # 0 outside answers
    out = []
    for label, lo, hi in buckets:
        inside = (pos >= lo) & ((pos <= hi) if hi is not None else True)
        out.append((label, int((inside & removed).sum()), int(inside.sum())))
    return out


# ---------------------------------------------------------------- removal by group of rows


@dataclass
class GroupRemoval:
    """Counts of one group of samples (a data tag, or harmful / other)."""

    samples: int = 0
    tokens: int = 0  # response tokens
    removed: int = 0
    openings: int = 0  # answer openings: the first response token of each turn
    openings_removed: int = 0


def removal_by_group(offsets: np.ndarray, row_index: np.ndarray, response_mask: np.ndarray,
                     removed: np.ndarray, group_of_row: Mapping[int, str],
                     default: str) -> dict[str, GroupRemoval]:
    """Where removed tokens fall, per group of rows (`group_of_row`; other rows: `default`)."""
    resp = response_mask.astype(bool)
    removed = removed.astype(bool) & resp
    opening = answer_positions(offsets, resp) == 0
    sample = np.repeat(np.arange(len(row_index)), np.diff(offsets))
    names = [group_of_row.get(int(r), default) for r in row_index]
    out: dict[str, GroupRemoval] = {}
    for name in sorted(set(names)):
        in_group = np.isin(sample, [i for i, n in enumerate(names) if n == name])
        out[name] = GroupRemoval(
            samples=names.count(name), tokens=int((resp & in_group).sum()),
            removed=int((removed & in_group).sum()), openings=int((opening & in_group).sum()),
            openings_removed=int((opening & removed & in_group).sum()))
    return out


def detector_figures(groups: Mapping[str, GroupRemoval], target: str) -> dict[str, Any]:
    """The detector's figures for the group `target` (e.g. the harmful samples) against the rest.

    precision: share of removed tokens that lie in `target`; its share of all response
    tokens is what a random choice would get. recall: share of `target`'s response
    tokens removed. first_token_removed_*: share of answer openings removed, in `target`
    and in the other samples.
    """
    t = groups.get(target, GroupRemoval())
    rest = [g for name, g in groups.items() if name != target]
    removed = t.removed + sum(g.removed for g in rest)
    tokens = t.tokens + sum(g.tokens for g in rest)
    other_openings = sum(g.openings for g in rest)
    return {
        "removed_tokens": removed,
        "precision": t.removed / max(1, removed),
        "harmful_share_of_response_tokens": t.tokens / max(1, tokens),
        "recall": t.removed / max(1, t.tokens),
        "first_token_removed_harmful": t.openings_removed / max(1, t.openings),
        "first_token_removed_other": sum(g.openings_removed for g in rest) / max(1, other_openings),
    }


# ---------------------------------------------------------------- shares


def floor_share(ratio: float, total: int) -> int:
    """floor(ratio x total) in decimal arithmetic (0.29 x 100 = 29, not 28.999...)."""
    return math.floor(Fraction(repr(float(ratio))) * total)
