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

Layout of OUT (named by `RefineLayout`): `round-0/adapter/` (the starting safety
adapter, unless one is given), `round-t/` for t >= 1 with `scores.safetensors` (the
ranking that chose the samples), `added.json` (row indices with their top token and
score), `harmful.jsonl` (the grown set), `adapter/` (the retrained safety model) and
`round.json` (the round's key and progress); `final/scores.safetensors`; and
`rounds.json`, the summary.

Each round has a key (`round_key`): the refine and train settings, the fingerprints
(config and weights) of the utility adapter and of the safety adapter the round
starts from, the data and harmful files' hashes, the rows added before and the key
of the round before. A round's files are reused only under the same key, so a
killed run resumes at the first unfinished round, and a changed input (k, retrain,
an adapter, the data) redoes the first round it touches and every later one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .cache import KeyedStore, adapter_fingerprint, cache_key, is_adapter_folder
from .checks import check_writable, choice, finite, hold
from .data import check_text_files
from .io import TossError, write_json, write_text
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
    resume: bool = True  # reuse rounds whose key matches; False: start over
    quiet: bool = False


@dataclass
class RefineResult:
    rounds: list[dict[str, Any]]
    final_safety: Path
    final_scores: Path
    summary: Path  # rounds.json


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


def _rows(path: str, skip_bad_rows: bool) -> dict[int, str]:
    """Raw JSON lines of a data file by row index (JSONL), so added samples keep every field."""
    from .data import read_rows

    return {r.index: json.dumps(r.data, ensure_ascii=False)
            for r in read_rows(path, skip_bad_rows=skip_bad_rows)}


def _check(s: RefineSettings) -> None:
    if s.rounds < 1:
        raise TossError(f"rounds must be at least 1, got {s.rounds}")
    if s.k < 1:
        raise TossError(f"k must be at least 1, got {s.k}")
    choice(s.retrain, "--retrain", ("scratch", "continue"))
    finite(s.ratio, "--ratio", 0, 1, low_open=True, high_open=True)
    check_writable(s.out, "refine output folder", folder=True)
    for name in ("data", "harmful"):
        if not Path(getattr(s, name)).exists():
            raise TossError(f"{getattr(s, name)}: {name} file not found")
    check_text_files([s.data, s.harmful])  # not UTF-8: stop now, not after round 0's training
    hold(s.out)  # one refine per output folder at a time (until this process exits)


def _score(s: RefineSettings, safety: Path, out: Path) -> Scores:
    # The utility model is the same in every round: after the first scoring only the
    # safety side is computed, its loss_utility reused (checked by fingerprint).
    first = RefineLayout(Path(s.out)).scores(1)
    if out.exists():  # the round's key matched; still, reuse only scores of these very adapters
        earlier = load_scores(out)
        if (earlier.meta.get("utility_adapter_sha256") == adapter_fingerprint(s.utility)
                and earlier.meta.get("safety_adapter_sha256") == adapter_fingerprint(safety)):
            return earlier
    score(ScoreSettings(model=s.train.model, utility=s.utility, safety=str(safety), data=s.data,
                        out=str(out), template=s.train.template,
                        max_seq_len=s.train.max_seq_len, batch_tokens=s.batch_tokens,
                        fmt=s.train.format, skip_bad_rows=s.train.skip_bad_rows,
                        quiet=s.quiet, dtype=s.train.dtype,
                        keep_quantized=s.train.keep_quantized,
                        reuse_utility=str(first) if out != first and first.exists() else None))
    return load_scores(out)


def _train_safety(s: RefineSettings, harmful: Path, out: Path, start: Path | None) -> Path:
    from .train import train

    started = (out / "train_log.jsonl").exists()  # a round killed while training: resume it
    settings = dataclasses.replace(s.train, data=str(harmful), out=str(out), mask=None, valid=None,
                                   resume=started, overwrite=not started, quiet=s.quiet,
                                   init_adapter=str(start) if start else None)
    train(settings)
    return out


@dataclass(frozen=True)
class RefineLayout:
    """The one place that names the paths of a refine folder (see the module docstring)."""

    out: Path

    def round_dir(self, t: int) -> Path:
        return self.out / f"round-{t}"

    def scores(self, t: int) -> Path:
        return self.round_dir(t) / "scores.safetensors"

    def added(self, t: int) -> Path:
        return self.round_dir(t) / "added.json"

    def harmful(self, t: int) -> Path:
        return self.round_dir(t) / "harmful.jsonl"

    def adapter(self, t: int) -> Path:
        return self.round_dir(t) / "adapter"

    def state(self, t: int) -> str:
        """The round's KeyedStore entry (OUT/round-t/round.json)."""
        return f"round-{t}/round"

    @property
    def final_dir(self) -> Path:
        return self.out / "final"

    @property
    def final_scores(self) -> Path:
        return self.final_dir / "scores.safetensors"

    @property
    def final_state(self) -> str:
        return "final/final"

    @property
    def summary(self) -> Path:
        return self.out / "rounds.json"

    def later_dirs(self, t: int) -> list[Path]:
        """round-t, every later round folder there is, and final/."""
        found = [p for p in self.out.glob("round-*") if p.is_dir()
                 and p.name[6:].isdigit() and int(p.name[6:]) >= t]
        return sorted(found) + [self.final_dir]


# Settings that change no round's files: where they go, how they print, how far they go,
# and the ratio, which only reports how the top-d set moves.
_NOT_IN_KEY = {"out", "quiet", "rounds", "ratio", "resume", "safety"}
_TRAIN_NOT_IN_KEY = {"data", "out", "mask", "valid", "init_adapter", "resume", "overwrite", "quiet"}


def round_key(s: RefineSettings, t: int, previous: str, safety: Path,
              added_before: set[int]) -> str:
    """The key of round t (t = 0: the starting safety model; t = rounds + 1: the final scoring)."""
    train = {f.name: getattr(s.train, f.name) for f in dataclasses.fields(s.train)
             if f.name not in _TRAIN_NOT_IN_KEY}
    if t == 0:  # trained on the harmful set alone: nothing else of refine goes into it
        return cache_key({"round": 0, "train": train, "harmful": Path(s.harmful)})
    settings = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                if f.name not in _NOT_IN_KEY | {"train", "data", "harmful", "utility"}}
    return cache_key({
        "round": t, "previous": previous, "settings": settings, "train": train,
        "data": Path(s.data), "harmful": Path(s.harmful),
        "utility": adapter_fingerprint(s.utility), "safety": adapter_fingerprint(safety),
        "added_before": sorted(added_before),
    })


def _discard(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)


def refine(s: RefineSettings, say: Callable[[str], None] | None = None) -> RefineResult:
    """Run (or resume) the TOSS-Pro rounds; return per-round stats and the final safety model.

    `say` gets the one-line messages (default: print, unless `s.quiet`).
    """
    _check(s)
    layout = RefineLayout(Path(s.out))
    layout.out.mkdir(parents=True, exist_ok=True)
    if say is None:
        say = (lambda m: None) if s.quiet else print
    store = KeyedStore(layout.out)
    harmful_rows = _rows(s.harmful, s.train.skip_bad_rows)
    if not harmful_rows:
        raise TossError(f"{s.harmful}: the harmful set has no rows")
    custom_rows = _rows(s.data, s.train.skip_bad_rows)
    if s.k * s.rounds > len(custom_rows):
        raise TossError(f"k={s.k} x rounds={s.rounds} is more than the {len(custom_rows)} samples of {s.data}")
    if not s.resume:
        _discard(layout.later_dirs(0))

    def enter(t: int, name: str, key: str, folders: list[Path]) -> dict[str, Any]:
        """The round's saved progress under `key`; a different key discards this and later rounds."""
        old = store.key_of(name)
        if old != key and (old is not None or any(p.exists() for p in folders)):
            what = "the final scoring" if t > s.rounds else f"round {t}"
            say(f"{what}: its inputs changed since the last run (settings, adapters, data or an "
                f"earlier round); redoing it{' and every later round' if t <= s.rounds else ''}")
            _discard(layout.later_dirs(t) if t > 0 else layout.later_dirs(0))
        state = store.load(name, key)
        if state is None:
            state = {}
            store.save(name, key, state)
        return state

    # round 0: the starting safety model, given or trained on the harmful set
    if s.safety:
        safety = Path(s.safety)
        key = cache_key({"round": 0, "safety": adapter_fingerprint(safety)})
    else:
        key = round_key(s, 0, "", Path(), set())
        state = enter(0, layout.state(0), key, [layout.round_dir(0)])
        safety = layout.adapter(0)
        if state.get("adapter") is None or not _same_adapter(safety, state["adapter"]):
            _train_safety(s, Path(s.harmful), safety, None)
            store.save(layout.state(0), key, {"adapter": adapter_fingerprint(safety)})
    added: set[int] = set()
    grown = list(harmful_rows.values())
    stats: list[dict[str, Any]] = []
    previous_top: set[int] | None = None
    for t in range(1, s.rounds + 1):
        key = round_key(s, t, key, safety, added)
        state = enter(t, layout.state(t), key, [layout.round_dir(t)])
        scores = _score(s, safety, layout.scores(t))
        picked = state.get("added")
        if picked is None:
            picked = top_samples(scores, s.k, added)
            if len(picked) < s.k:
                raise TossError(f"round {t}: only {len(picked)} samples left to add, k={s.k}")
            state = {"added": picked}
            store.save(layout.state(t), key, state)
            write_json(layout.added(t), {"round": t, "added": picked})
        added |= {p["row_index"] for p in picked}
        grown += [custom_rows[p["row_index"]] for p in picked]
        write_text(layout.harmful(t), "".join(line + "\n" for line in grown))
        start = safety if s.retrain == "continue" else None
        safety = layout.adapter(t)
        if state.get("adapter") is None or not _same_adapter(safety, state["adapter"]):
            _train_safety(s, layout.harmful(t), safety, start)
            store.save(layout.state(t), key, {**state, "adapter": adapter_fingerprint(safety)})
        top = top_token_set(scores, s.ratio)
        stats.append({
            "round": t,
            "added": [p["row_index"] for p in picked],
            "harmful_size": len(grown),
            "scores": str(layout.scores(t)),
            "mean_score_added": float(np.mean([p["score"] for p in picked])),
            "mean_score_all": float(scores.score[scores.response_mask.astype(bool)].mean()),
            "top_overlap_with_previous": (len(top & previous_top) / max(1, len(top))
                                          if previous_top is not None else None),
        })
        previous_top = top
        say(f"round {t}: added {len(picked)} samples (mean top score "
            f"{stats[-1]['mean_score_added']:.3f}), harmful set now {len(grown)}")

    key = round_key(s, s.rounds + 1, key, safety, added)
    enter(s.rounds + 1, layout.final_state, key, [layout.final_dir])
    final = _score(s, safety, layout.final_scores)
    top = top_token_set(final, s.ratio)
    summary = {"rounds": stats, "final_safety": str(safety),
               "final_scores": str(layout.final_scores),
               "final_top_overlap_with_last_round": len(top & previous_top) / max(1, len(top))
               if previous_top is not None else None}
    write_json(layout.summary, summary)
    return RefineResult(stats, safety, layout.final_scores, layout.summary)


def _same_adapter(folder: Path, fingerprint: str) -> bool:
    """Whether `folder` still holds the adapter a round saved (not edited or half-written since)."""
    return is_adapter_folder(folder) and adapter_fingerprint(folder) == fingerprint


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
