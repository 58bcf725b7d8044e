"""Paired intervals of the harmful-answer NLL gap past the opening between two methods of one seed.

`bench/reproduce.py`'s deep-safety table gives each method's gap to its base (nats per answer
token, token-weighted over the held-out pairs) without an interval on the difference between
methods. The pairs are the same for every method, so the difference is paired: this resamples
the pairs (bootstrap, 5000 draws) and reports the token-weighted difference with its 95% interval.

    python bench/gap_pairs.py RUN/seed0/result.json toss_d0.1:first5 toss_d0.1:standard_sft
"""

from __future__ import annotations

import json
import sys

import numpy as np

PAST_OPENING = ("6-20", "21-80", "81+")  # the 6+ bucket of the table


def gap_sums(method: dict, buckets: tuple[str, ...] = PAST_OPENING) -> np.ndarray:
    """[pairs, 2]: each pair's summed NLL gap and its token count over `buckets`."""
    return np.array([(sum(p["gap"][b] * p["tokens"][b] for b in buckets if p["gap"][b] is not None),
                      sum(p["tokens"][b] for b in buckets if p["gap"][b] is not None))
                     for p in method["deep_samples"]["depth"]], np.float64)


def paired_difference(a: np.ndarray, b: np.ndarray, draws: int = 5000, seed: int = 0) -> tuple[float, list[float]]:
    """Token-weighted gap of `a` minus `b` over the same pairs, with a bootstrap 95% interval."""
    if not np.array_equal(a[:, 1], b[:, 1]):
        raise SystemExit("the two methods were measured on different tokens")
    diff, tokens = a[:, 0] - b[:, 0], a[:, 1]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), (draws, len(diff)))
    boot = diff[picks].sum(1) / tokens[picks].sum(1)
    return float(diff.sum() / tokens.sum()), [float(x) for x in np.percentile(boot, [2.5, 97.5])]


def main(argv: list[str]) -> int:
    result = json.load(open(argv[0]))
    for pair in argv[1:]:
        x, y = pair.split(":")
        est, ci = paired_difference(gap_sums(result["methods"][x]), gap_sums(result["methods"][y]))
        print(f"{x} - {y}: {est:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] nats per answer token past token 5")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
