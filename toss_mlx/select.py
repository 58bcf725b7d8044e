"""Token selection: which response tokens leave the loss, from a scores file.

`select_tokens(scores, ratio, strategy, level)` returns `keep` (uint8 [T],
1 = the token stays in the loss; prompt tokens are 0 because they are never
in it). Removed tokens stay in the input as context. Strategies:

- `toss` (the paper): remove the floor(ratio x scored tokens) tokens with the
  highest score S = loss_utility - loss_safety. `global` ranks over the whole data set
  (the paper's setting), `sample` removes the same share within each sample.
- `safety-only` / `utility-only` (the paper's ablations): rank by -loss_safety
  alone / by loss_utility alone, same counts.
- `random`: the same number of response tokens, uniformly at random (seeded).
- `first-k`: the first k response tokens of every assistant turn, the
  fixed-position masking of the paper's diagnosis (`ratio` does not apply).
- `sample-filter`: the sample-level defence: drop whole samples, highest mean
  score first, until at least floor(ratio x scored tokens) tokens are removed.

Ties are broken deterministically: the earlier token (or sample) goes first.
Counts are exact: floor(ratio x n) in decimal arithmetic (see `floor_share`).

Output file: `mask.safetensors` (README.md, "Files"; read back by
`toss_mlx.layout.load_mask`), with the scores' metadata plus strategy, level, ratio,
removed_tokens, samples_fully_removed, samples_touched, scored_tokens (and k or seed
where they apply).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_writable
from .io import TossError, save_arrays, sha256_file
from .layout import Scores, answer_positions, floor_share, load_scores, removal_by_position

STRATEGIES = ("toss", "random", "first-k", "sample-filter", "safety-only", "utility-only")
LEVELS = ("global", "sample")


@dataclass
class Selection:
    keep: np.ndarray  # uint8 [T]: 1 = response token that stays in the loss
    removed: np.ndarray  # bool [T]
    strategy: str
    level: str
    ratio: float
    stats: dict[str, Any]
    k: int | None = None
    seed: int | None = None

    def metadata(self, scores: Scores) -> dict[str, str]:
        meta = dict(scores.meta)
        meta.update({"strategy": self.strategy, "level": self.level, "ratio": repr(float(self.ratio)),
                     "removed_tokens": str(self.stats["removed_tokens"]),
                     "samples_fully_removed": str(self.stats["samples_fully_removed"]),
                     "samples_touched": str(self.stats["samples_touched"]),
                     "scored_tokens": str(self.stats["scored_tokens"])})
        if self.k is not None:
            meta["k"] = str(self.k)
        if self.seed is not None:
            meta["seed"] = str(self.seed)
        return meta


# ---------------------------------------------------------------- selection


def _check_args(ratio: float, strategy: str, level: str, k: int) -> None:
    if strategy not in STRATEGIES:
        raise TossError(f"unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    if level not in LEVELS:
        raise TossError(f"unknown level {level!r} (expected one of {', '.join(LEVELS)})")
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio < 1:
        raise TossError(f"ratio must be between 0 and 1 (exclusive), got {ratio!r}")
    if strategy in ("first-k", "sample-filter") and level != "global":
        raise TossError(f"strategy {strategy} has no per-sample level; leave --level at global")
    if strategy == "first-k" and (not isinstance(k, int) or k < 1):
        raise TossError(f"k must be a positive integer for first-k, got {k!r}")


def _top_by_key(key: np.ndarray, candidates: np.ndarray, quota: np.ndarray | int,
                groups: np.ndarray | None) -> np.ndarray:
    """Candidates with the highest key: the top `quota` overall, or per group when `groups` is set.

    Ties go to the earlier position (candidates are ascending positions).
    """
    if groups is None:
        order = np.lexsort((candidates, -key))
        return candidates[order[:int(quota)]]
    order = np.lexsort((candidates, -key, groups))
    g = groups[order]
    first = np.searchsorted(g, g, side="left")  # index where each group starts in the sorted order
    rank = np.arange(len(order)) - first
    return candidates[order[rank < quota[g]]]


def select_tokens(scores: Scores, ratio: float = 0.1, strategy: str = "toss", level: str = "global",
                  k: int = 5, seed: int = 0) -> Selection:
    """Choose the response tokens to remove; see the module docstring for the strategies."""
    _check_args(ratio, strategy, level, k)
    scored = scores.response_mask.astype(bool)
    candidates = np.nonzero(scored)[0]
    sample = scores.sample_ids()
    n_total = floor_share(ratio, len(candidates))
    frac = Fraction(repr(float(ratio)))
    per_sample = np.bincount(sample[candidates], minlength=scores.samples)
    quota = (per_sample * frac.numerator) // frac.denominator  # exact floor, per sample

    removed = np.zeros(len(scored), bool)
    if strategy in ("toss", "safety-only", "utility-only", "random"):
        if strategy == "toss":
            key = scores.score[candidates]
        elif strategy == "safety-only":
            key = -scores.loss_safety[candidates]
        elif strategy == "utility-only":
            key = scores.loss_utility[candidates]
        else:  # the n highest of iid uniform keys: a uniformly random subset of size n
            key = np.random.default_rng(seed).random(len(candidates))
        key = key.astype(np.float64)
        if level == "global":
            removed[_top_by_key(key, candidates, n_total, None)] = True
        else:
            removed[_top_by_key(key, candidates, quota, sample[candidates])] = True
    elif strategy == "first-k":
        pos = answer_positions(scores.offsets, scores.response_mask)
        removed = scored & (pos >= 0) & (pos < k)
    else:  # sample-filter
        counts = per_sample.astype(np.int64)
        sums = np.bincount(sample[candidates], weights=scores.score[candidates].astype(np.float64),
                           minlength=scores.samples)
        has = np.nonzero(counts > 0)[0]
        mean = sums[has] / counts[has]
        order = has[np.lexsort((has, -mean))]
        cum = np.cumsum(counts[order])
        m = 0 if n_total == 0 else int(np.searchsorted(cum, n_total, side="left")) + 1
        dropped = np.zeros(scores.samples, bool)
        dropped[order[:m]] = True
        removed = scored & dropped[sample]
    keep = (scored & ~removed).astype(np.uint8)
    return Selection(keep, removed, strategy, level, float(ratio), selection_stats(scores, removed),
                     k=k if strategy == "first-k" else None,
                     seed=seed if strategy == "random" else None)


def selection_stats(scores: Scores, removed: np.ndarray) -> dict[str, Any]:
    """Counts for the summary: removed, samples touched/emptied, removal by answer position."""
    scored = scores.response_mask.astype(bool)
    sample = scores.sample_ids()
    per_sample = np.bincount(sample[scored], minlength=scores.samples)
    removed_per_sample = np.bincount(sample[removed], minlength=scores.samples)
    n_removed = int(removed.sum())
    buckets = {}
    for name, gone, tokens in removal_by_position(scores.offsets, scores.response_mask, removed):
        buckets[name] = {"tokens": tokens, "removed": gone,
                         "rate": gone / tokens if tokens else 0.0,
                         "share_of_removed": gone / n_removed if n_removed else 0.0}
    return {
        "scored_tokens": int(scored.sum()),
        "removed_tokens": n_removed,
        "samples": int(scores.samples),
        "samples_touched": int((removed_per_sample > 0).sum()),
        "samples_fully_removed": int(((per_sample > 0) & (removed_per_sample == per_sample)).sum()),
        "by_position": buckets,
    }


def format_summary(sel: Selection) -> str:
    s = sel.stats
    share = s["removed_tokens"] / s["scored_tokens"] if s["scored_tokens"] else 0.0
    what = f"{sel.strategy}" + (f" (k={sel.k})" if sel.k is not None else "") + \
        (f", {sel.level}, ratio {sel.ratio:g}" if sel.strategy not in ("first-k",) else "")
    lines = [
        f"{what}: removed {s['removed_tokens']} of {s['scored_tokens']} response tokens ({share:.1%})",
        f"samples touched {s['samples_touched']} of {s['samples']}, "
        f"samples that lost every response token {s['samples_fully_removed']}",
        "removal by position in the answer:",
    ]
    for name, b in s["by_position"].items():
        lines.append(f"  {name:>8}: {b['removed']:>8} of {b['tokens']:>8} removed ({b['rate']:.1%}), "
                     f"{b['share_of_removed']:.1%} of all removed")
    return "\n".join(lines)


# ---------------------------------------------------------------- files


def check_scores_match(scores: Scores, data: str | os.PathLike, tokenizer=None,
                       what: str = "the scores") -> None:
    """Refuse scores made for other data: the file hash, and with a tokenizer every token."""
    from .data import check_fingerprint, tokenize_dataset

    p = Path(data)
    if p.exists():
        got = sha256_file(p)
        if got != scores.meta.get("dataset_sha256"):
            raise TossError(f"{what} were made for other data: dataset_sha256 "
                            f"{scores.meta.get('dataset_sha256', '?')[:16]} in the scores, "
                            f"{got[:16]} for {p}")
    if tokenizer is None:
        return
    tokenized = tokenize_dataset(p, tokenizer, template=scores.meta["template"],
                                 max_seq_len=int(scores.meta["max_seq_len"]))
    check_fingerprint(tokenized.fingerprint, scores.meta, what)
    flat = tokenized.flat()
    if not (np.array_equal(flat["offsets"], scores.offsets)
            and np.array_equal(flat["token_ids"], scores.token_ids)):
        raise TossError(f"{what} do not hold the tokens of {p} (same file hashes, other tokens)")


def write_mask(path: str | os.PathLike, scores: Scores, sel: Selection) -> None:
    save_arrays(path, {"offsets": scores.offsets, "row_index": scores.row_index, "keep": sel.keep},
                sel.metadata(scores))


def select_file(scores_path: str | os.PathLike, out: str | os.PathLike, ratio: float = 0.1,
                strategy: str = "toss", level: str = "global", k: int = 5, seed: int = 0,
                data: str | os.PathLike | None = None, tokenizer=None) -> Selection:
    """Read a scores file, select, write `out` atomically. Every check runs before any write."""
    _check_args(ratio, strategy, level, k)
    check_writable(out, "mask file")
    scores = load_scores(scores_path)
    if data is not None:
        check_scores_match(scores, data, tokenizer, what=f"{scores_path}")
    if scores.scored_tokens == 0:
        raise TossError(f"{scores_path}: no scored response tokens to select from")
    sel = select_tokens(scores, ratio, strategy, level, k, seed)
    check_removal(sel, ratio)
    write_mask(out, scores, sel)
    return sel


def check_removal(sel: Selection, ratio: float) -> None:
    """A selection that removes nothing, or every response token, is almost surely a mistake."""
    removed, scored = sel.stats["removed_tokens"], sel.stats["scored_tokens"]
    what = f"first-k with k={sel.k}" if sel.strategy == "first-k" else \
        f"{sel.strategy} at ratio {ratio:g} ({sel.level})"
    if removed == 0:
        hint = "a larger --k" if sel.strategy == "first-k" else \
            f"a ratio of at least {1 / scored:.2g} (one token of {scored})"
        raise TossError(f"{what} removes 0 of {scored} response tokens; use {hint}")
    if removed == scored:
        hint = "a smaller --k" if sel.strategy == "first-k" else "a smaller --ratio"
        raise TossError(f"{what} removes every one of the {scored} response tokens, leaving "
                        f"nothing to train on; use {hint}")


def select(scores: str | os.PathLike, out: str | os.PathLike, ratio: float = 0.1,
           strategy: str = "toss", level: str = "global", k: int = 5, seed: int = 0,
           data: str | os.PathLike | None = None, tokenizer=None) -> dict[str, Any]:
    """`toss-mlx select` as a function: write the mask, return the summary as a JSON-able dict."""
    sel = select_file(scores, out, ratio, strategy, level, k, seed, data, tokenizer)
    return {"strategy": sel.strategy, "level": sel.level, "ratio": sel.ratio, "k": sel.k,
            "seed": sel.seed, **sel.stats}
