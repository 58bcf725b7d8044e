"""evaluate.compare: paired differences between two models of one evaluation, against hand
counts and a bootstrap written as a plain loop."""

import numpy as np
import pytest

from toss_mlx.evaluate.compare import compare_models, paired_bootstrap


def naive_bootstrap(a, b, w, draws=4000, seed=0):
    """The same resampling, one draw at a time with Python sums."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (draws, len(a)))
    boot = []
    for row in idx:
        sa = sum(a[i] for i in row)
        sb = sum(b[i] for i in row)
        sw = sum(w[i] for i in row)
        boot.append((sa - sb) / sw)
    boot.sort()
    # numpy's default percentile: linear interpolation between order statistics
    def pct(q):
        pos = q / 100 * (len(boot) - 1)
        lo = int(np.floor(pos))
        return boot[lo] + (boot[min(lo + 1, len(boot) - 1)] - boot[lo]) * (pos - lo)
    return pct(2.5), pct(97.5)


def models():
    harmful_a = [1, 1, 1, 0, 1, 1, 1, 1]
    harmful_b = [0, 1, 0, 0, 1, 0, 1, 0]
    nll_a, nll_b, tokens = [3.0, 5.0, 2.0, 8.0], [2.5, 4.0, 2.5, 6.0], [10, 20, 5, 25]
    def entry(name, harmful, nll, recovered):
        return {"name": name, "prompts": {
            "harmful": [{"row": i, "prompt": f"p{i}", "refusal": bool(v)} for i, v in enumerate(harmful)],
            "benign": [{"row": i, "reference_nll": x, "reference_tokens": t}
                       for i, (x, t) in enumerate(zip(nll, tokens, strict=True))],
            "prefill": [{"row": i, "k": k, "recovered": bool(v)}
                        for k in (5, 10) for i, v in enumerate(recovered)]}}
    return [entry("standard_sft", harmful_b, nll_b, [0, 0, 1]),
            entry("toss", harmful_a, nll_a, [1, 0, 1])], (harmful_a, harmful_b, nll_a, nll_b, tokens)


def test_differences_match_hand_counts_and_a_plain_bootstrap():
    entries, (ha, hb, na, nb, tokens) = models()
    diffs = compare_models(entries, "toss", "standard_sft")
    assert set(diffs) == {"refusal_rate", "prefill_recovery@5", "prefill_recovery@10", "nll"}
    r = diffs["refusal_rate"]
    assert (r["value"], r["other"], r["n"]) == (7 / 8, 3 / 8, 8)
    assert r["diff"] == pytest.approx(0.5)
    assert r["ci95"] == pytest.approx(naive_bootstrap(ha, hb, [1] * 8), abs=1e-12)
    assert r["ci95"][0] <= r["diff"] <= r["ci95"][1]
    n = diffs["nll"]
    assert n["value"] == pytest.approx(18 / 60) and n["other"] == pytest.approx(15 / 60)
    assert n["diff"] == pytest.approx(3 / 60)
    assert n["ci95"] == pytest.approx(naive_bootstrap(na, nb, tokens), abs=1e-12)
    assert diffs["prefill_recovery@10"]["diff"] == pytest.approx(1 / 3)


def test_models_that_answered_different_prompts_are_refused():
    entries, _ = models()
    entries[1]["prompts"]["harmful"] = entries[1]["prompts"]["harmful"][:-1]
    with pytest.raises(ValueError, match="different prompts"):
        compare_models(entries, "toss", "standard_sft")
    with pytest.raises(ValueError, match="no model named nope"):
        compare_models(entries, "nope", "toss")


def test_identical_models_differ_by_exactly_zero():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    result = paired_bootstrap(a, a.copy())
    assert result == {"diff": 0.0, "ci95": [0.0, 0.0], "n": 4}
    with pytest.raises(ValueError):
        paired_bootstrap(np.array([]), np.array([]))
