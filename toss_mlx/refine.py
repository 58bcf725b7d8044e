"""TOSS-Pro: progressive refinement of the safety-degraded reference model.

The utility model stays fixed. Each round t = 1..T:
1. score the custom data D with the current safety model and the utility model;
2. walk down the token ranking (highest S first) and collect the first K
   distinct samples of D not added in an earlier round;
3. add those whole samples (prompt and response) to the harmful set;
4. retrain the safety model on the grown set (`scratch`: from the base;
   `continue`: from the previous round's adapter).
After the last round the final safety model scores D once more; that file
feeds `select` as usual.

Layout of OUT: `round-0/` (the starting safety adapter, unless one is given),
`round-t/` for t >= 1 with `scores.safetensors` (the ranking that chose the
samples), `added.json` (row indices with their top token and score),
`harmful.jsonl` (the grown set), `adapter/` (the retrained safety model) and
`train_log.jsonl`; `final/scores.safetensors`; and `rounds.json`, the summary.
A killed run resumes at the first unfinished round.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .io import TossError, read_json, write_json, write_text
from .layout import Scores, floor_share, load_scores
from .score import ScoreSettings, score
from .train import TrainSettings


@dataclass
class RefineSettings:
    data: str  # the custom data D
    harmful: str  # the starting harmful set D_h
    utility: str  # the utility-oriented adapter (fixed)
    out: str
    train: TrainSettings  # how safety models are trained (model, LoRA, lr, epochs...)
    rounds: int = 2
    k: int = 10
    safety: str | None = None  # round-0 safety adapter; none: train one on `harmful`
    retrain: Literal["scratch", "continue"] = "scratch"
    ratio: float = 0.1  # for the report of how the top-d token set moves between rounds
    batch_tokens: int = 4096
    quiet: bool = False


@dataclass
class RefineResult:
    rounds: list[dict[str, Any]]
    final_safety: Path
    final_scores: Path


def _ranking(scores: Scores) -> np.ndarray:
    """Response-token positions, highest S first; ties by position, so the walk is deterministic."""
    scored = np.flatnonzero(scores.response_mask.astype(bool))
    return scored[np.lexsort((scored, -scores.score[scored]))]


def top_samples(scores: Scores, k: int, exclude: set[int]) -> list[dict[str, Any]]:
    """The first k distinct samples met walking down the token ranking, skipping `exclude`."""
    offsets, rows = scores.offsets, scores.row_index
    order = _ranking(scores)
    sample_of = np.searchsorted(offsets, order, side="right") - 1
    picked: list[dict[str, Any]] = []
    seen: set[int] = set()
    for token, i in zip(order.tolist(), sample_of.tolist(), strict=True):
        row = int(rows[i])
        if row in exclude or row in seen:
            continue
        seen.add(row)
        picked.append({"row_index": row, "sample": i, "token": token - int(offsets[i]),
                       "token_id": int(scores.token_ids[token]),
                       "score": float(scores.score[token])})
        if len(picked) == k:
            break
    return picked


def top_token_set(scores: Scores, ratio: float) -> set[int]:
    """The token positions the global top-d selection would remove."""
    return set(_ranking(scores)[:floor_share(ratio, scores.scored_tokens)].tolist())


def _rows(path: str) -> dict[int, str]:
    """Raw JSON lines of a data file by row index (JSONL), so added samples keep every field."""
    from .data import read_rows

    return {r.index: json.dumps(r.data, ensure_ascii=False) for r in read_rows(path)}


def _check(s: RefineSettings) -> None:
    if s.rounds < 1:
        raise TossError(f"rounds must be at least 1, got {s.rounds}")
    if s.k < 1:
        raise TossError(f"k must be at least 1, got {s.k}")
    for name in ("data", "harmful"):
        if not Path(getattr(s, name)).exists():
            raise TossError(f"{getattr(s, name)}: {name} file not found")


def _score(s: RefineSettings, safety: Path, out: Path) -> Scores:
    # The utility model is the same in every round: after the first scoring only the
    # safety side is computed, its loss_utility reused (checked by fingerprint).
    first = Path(s.out) / "round-1" / "scores.safetensors"
    if not out.exists():
        score(ScoreSettings(model=s.train.model, utility=s.utility, safety=str(safety), data=s.data,
                            out=str(out), template=s.train.template,
                            max_seq_len=s.train.max_seq_len, batch_tokens=s.batch_tokens,
                            quiet=s.quiet,
                            reuse_utility=str(first) if out != first and first.exists() else None))
    return load_scores(out)


def _train_safety(s: RefineSettings, harmful: Path, out: Path, start: Path | None) -> Path:
    from .train import train

    if (out / "adapters.safetensors").exists() and (out / "done").exists():
        return out
    started = (out / "train_log.jsonl").exists()
    settings = dataclasses.replace(s.train, data=str(harmful), out=str(out), mask=None, valid=None,
                                   resume=started, overwrite=not started, quiet=s.quiet,
                                   init_adapter=str(start) if start else None)
    train(settings)
    write_text(out / "done", "")
    return out


def refine(s: RefineSettings) -> RefineResult:
    """Run (or resume) the TOSS-Pro rounds; return per-round stats and the final safety model."""
    _check(s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: None) if s.quiet else print
    harmful_rows = _rows(s.harmful)
    if not harmful_rows:
        raise TossError(f"{s.harmful}: the harmful set has no rows")
    custom_rows = _rows(s.data)
    if s.k * s.rounds > len(custom_rows):
        raise TossError(f"k={s.k} x rounds={s.rounds} is more than the {len(custom_rows)} samples of {s.data}")

    safety = Path(s.safety) if s.safety else _train_safety(s, Path(s.harmful), out / "round-0" / "adapter", None)
    added: set[int] = set()
    grown = list(harmful_rows.values())
    stats: list[dict[str, Any]] = []
    previous_top: set[int] | None = None
    for t in range(1, s.rounds + 1):
        round_dir = out / f"round-{t}"
        scores = _score(s, safety, round_dir / "scores.safetensors")
        if (round_dir / "added.json").exists():  # resumed: the choice was made already
            picked = read_json(round_dir / "added.json")["added"]
        else:
            picked = top_samples(scores, s.k, added)
            if len(picked) < s.k:
                raise TossError(f"round {t}: only {len(picked)} samples left to add, k={s.k}")
            write_json(round_dir / "added.json", {"round": t, "added": picked})
        added |= {p["row_index"] for p in picked}
        grown += [custom_rows[p["row_index"]] for p in picked]
        harmful_t = round_dir / "harmful.jsonl"
        write_text(harmful_t, "".join(line + "\n" for line in grown))
        start = safety if s.retrain == "continue" else None
        safety = _train_safety(s, harmful_t, round_dir / "adapter", start)
        top = top_token_set(scores, s.ratio)
        stats.append({
            "round": t,
            "added": [p["row_index"] for p in picked],
            "harmful_size": len(grown),
            "mean_score_added": float(np.mean([p["score"] for p in picked])),
            "mean_score_all": float(scores.score[scores.response_mask.astype(bool)].mean()),
            "top_overlap_with_previous": (len(top & previous_top) / max(1, len(top))
                                          if previous_top is not None else None),
        })
        previous_top = top
        say(f"round {t}: added {len(picked)} samples (mean top score "
            f"{stats[-1]['mean_score_added']:.3f}), harmful set now {len(grown)}")

    final = _score(s, safety, out / "final" / "scores.safetensors")
    top = top_token_set(final, s.ratio)
    summary = {"rounds": stats, "final_safety": str(safety),
               "final_scores": str(out / "final" / "scores.safetensors"),
               "final_top_overlap_with_last_round": len(top & previous_top) / max(1, len(top))
               if previous_top is not None else None}
    write_json(out / "rounds.json", summary)
    return RefineResult(stats, safety, out / "final" / "scores.safetensors")


def rounds_table(result: RefineResult):
    """A rich table: per round, the samples added and how the score distribution moved."""
    from rich.table import Table

    table = Table(title="TOSS-Pro rounds")
    for col in ("round", "added", "harmful set", "mean S added", "mean S all", "top-d overlap"):
        table.add_column(col, justify="right")
    for r in result.rounds:
        overlap = r["top_overlap_with_previous"]
        table.add_row(str(r["round"]), str(len(r["added"])), str(r["harmful_size"]),
                      f"{r['mean_score_added']:.3f}", f"{r['mean_score_all']:.3f}",
                      "-" if overlap is None else f"{overlap:.0%}")
    return table
