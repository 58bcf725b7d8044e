"""Paired intervals of the harmful-answer NLL gap past the opening between any two methods of one seed.

`bench/reproduce.py` pools TOSS and TOSS-Pro against every other method in its results
(`harmful_gap_contrasts`, `reproduce.gap_contrasts`); this asks the same of any two methods of one
seed folder's result.json, e.g. first-5 against standard SFT. The pairs are the same for every
method, so the difference is paired: `reproduce.paired_difference` resamples the pairs.

    python bench/gap_pairs.py RUN/seed0/result.json first5:standard_sft sample_filter:first5
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402  (bench/reproduce.py: gap_sums, paired_difference)


def main(argv: list[str]) -> int:
    result = json.load(open(argv[0]))
    for pair in argv[1:]:
        x, y = (result["methods"][name]["deep_samples"]["depth"] for name in pair.split(":"))
        c = reproduce.paired_difference(reproduce.gap_sums(x), reproduce.gap_sums(y))
        print(f"{pair.replace(':', ' - ')}: {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
              f"nats per answer token past token 5 ({c['pairs']} pairs, {c['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
