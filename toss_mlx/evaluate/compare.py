"""Two models of one evaluation side by side: paired differences with bootstrap intervals.

`eval` answers every prompt with every model, so a difference between two models is
taken prompt by prompt, and its 95% interval comes from resampling the prompts with
both models' outcomes kept together (a paired bootstrap, 4,000 draws, seeded). The
interval says how far the difference would move had other prompts been drawn; it does
not cover training noise (another seed), which only more runs can show.

    diffs = compare_models(eval_json["models"], "toss", "standard_sft")
    diffs["refusal_rate"]  # {"value": 0.96, "other": 0.63, "diff": 0.33, "ci95": [...], "n": 24}
"""

from __future__ import annotations

from typing import Any

import numpy as np

DRAWS = 4000


def paired_bootstrap(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None,
                     draws: int = DRAWS, seed: int = 0) -> dict[str, Any]:
    """sum(a - b) / sum(weights) over paired items (weights default to 1: a difference of
    means), with a paired bootstrap 95% interval: items are drawn with replacement, each
    keeping its a, b and weight. For per-problem summed NLLs and token counts this is the
    token-weighted NLL difference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
    if not (len(a) == len(b) == len(w)) or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs equal, non-empty arrays ({len(a)}, {len(b)}, {len(w)})")
    idx = np.random.default_rng(seed).integers(0, len(a), (draws, len(a)))
    boot = (a[idx].sum(1) - b[idx].sum(1)) / w[idx].sum(1)
    return {"diff": float((a.sum() - b.sum()) / w.sum()),
            "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "n": int(len(a))}


def _paired_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], what: str
                 ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Rows of two models matched by (row, prefill K); both must hold the same prompts."""
    def keyed(rows: list[dict[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any]]:
        return {(r.get("row"), r.get("k")): r for r in rows}

    ka, kb = keyed(rows_a), keyed(rows_b)
    if ka.keys() != kb.keys():
        raise ValueError(f"{what}: the two models answered different prompts; compare models "
                         "of one evaluation")
    return [(ka[k], kb[k]) for k in ka]


def compare_models(models: list[dict[str, Any]], name: str, other: str) -> dict[str, dict[str, Any]]:
    """`name` minus `other` on every figure both have, from one eval file's `models` list:
    refusal_rate (AdvBench), over_refusal_rate (edgy), prefill_recovery@K and nll (task,
    token-weighted). Each: the two values, diff, paired 95% interval, prompts n."""
    by_name = {m["name"]: m for m in models}
    missing = [n for n in (name, other) if n not in by_name]
    if missing:
        raise ValueError(f"no model named {', '.join(missing)} in the evaluation "
                         f"(it has {', '.join(by_name)})")
    pa, pb = (by_name[n].get("prompts") or {} for n in (name, other))
    out: dict[str, dict[str, Any]] = {}

    def add(key: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]], field: str,
            weight: str | None = None) -> None:
        if not pairs:
            return
        a = np.array([float(ra[field]) for ra, _ in pairs])
        b = np.array([float(rb[field]) for _, rb in pairs])
        w = None if weight is None else np.array([float(ra[weight]) for ra, _ in pairs])
        if w is not None and not np.array_equal(w, [float(rb[weight]) for _, rb in pairs]):
            raise ValueError(f"{key}: the two models scored different reference tokens")
        total = len(a) if w is None else w.sum()
        out[key] = {"value": float(a.sum() / total), "other": float(b.sum() / total),
                    **paired_bootstrap(a, b, w)}

    for set_name, key in (("harmful", "refusal_rate"), ("edgy", "over_refusal_rate")):
        if pa.get(set_name) and pb.get(set_name):
            add(key, _paired_rows(pa[set_name], pb[set_name], set_name), "refusal")
    if pa.get("prefill") and pb.get("prefill"):
        pairs = _paired_rows(pa["prefill"], pb["prefill"], "prefill")
        for k in sorted({ra["k"] for ra, _ in pairs}):
            add(f"prefill_recovery@{k}", [p for p in pairs if p[0]["k"] == k], "recovered")
    if pa.get("benign") and pb.get("benign"):
        pairs = [(ra, rb) for ra, rb in _paired_rows(pa["benign"], pb["benign"], "benign")
                 if ra.get("reference_tokens")]
        add("nll", pairs, "reference_nll", weight="reference_tokens")
    return out
