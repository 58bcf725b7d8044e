"""The visual report: one self-contained HTML file a person can read.

What goes in, from
`toss-mlx report (RUN_DIR | --scores S [--mask M] [--data D]) [--eval E.json] --out report.html`:
- scores.safetensors (from `toss-mlx score`) and, optionally, mask.safetensors
  (from `toss-mlx select`): the flat layout of README.md ("Files"), read and
  checked by `toss_mlx.layout`.
- the data file (optional): checked against the scores' dataset hash; a
  row's `source` / `label` / `category` / `origin` string becomes its tag,
  and the report shows how removal splits across tags (for data mixed from
  known sources: the detector's precision and recall).
- eval*.json files (from `toss-mlx eval`, optional): the safety-utility
  chart and the metrics table.

A run directory (from `toss-mlx run`) is searched for these files: the
shallowest `scores.safetensors` and `mask.safetensors` under it (the final
ones, not a TOSS-Pro round's, which sit one level deeper in `round-t/`), and
every `eval*.json` under it. A `manifest.json` there may name the `model`
and `data` (top-level string keys); explicit options win over it.

Token text needs the tokenizer the scores were made with: `--model`, else the
`model` recorded in the scores (or the manifest); its hash must match the
scores' `tokenizer_sha256`.

What comes out, top to bottom: a summary; the token heatmap (the riskiest
samples by their highest token score, then a seeded random sample of the
rest) where every response token is coloured by S (red: high = unsafe, blue:
low), removed tokens are struck through, and hovering a token shows its loss_utility
(loss_u), loss_safety (loss_h) and S; the score histogram with the selection threshold; removal rate
by position in the response (the paper's diagnosis: removal concentrates on
the first tokens, but not only there); removal by data tag; the
safety-utility chart and metrics table of the evaluations. No scripts, no
network, no external fonts: charts are inline SVG from `toss_mlx.charts`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from .charts import bars_svg, histogram_svg, lines_svg, scatter_svg
from .data import read_rows
from .evaluate import format_metric, metric_rows
from .io import TossError, read_json, sha256_file, write_text
from .layout import CHART_BUCKETS, FINGERPRINT_KEYS, load_mask, load_scores, removal_by_group
from .layout import removal_by_position as layout_removal_by_position

TAG_KEYS = ("source", "label", "category", "origin")
MAX_TOKENS_SHOWN = 512  # response tokens drawn per sample; the rest is summarized
CONTEXT_HEAD, CONTEXT_TAIL = 80, 240  # characters of prompt context shown around "..."


@dataclass
class ReportInputs:
    scores: Path | None = None
    mask: Path | None = None
    data: Path | None = None
    evals: list[Path] = field(default_factory=list)
    model: str | None = None


# ---------------------------------------------------------------- finding and reading inputs


def _shallowest(run_dir: Path, name: str) -> Path | None:
    found = sorted(run_dir.rglob(name), key=lambda p: (len(p.relative_to(run_dir).parts), str(p)))
    if not found:
        return None
    depth = len(found[0].relative_to(run_dir).parts)
    tied = [p for p in found if len(p.relative_to(run_dir).parts) == depth]
    if len(tied) > 1:
        raise TossError(f"{run_dir}: several {name} files at the same level "
                        f"({', '.join(str(p) for p in tied)}); pick one with --scores/--mask")
    return found[0]


def report_inputs(run_dir: str | os.PathLike | None, scores: Path | None = None,
                  mask: Path | None = None, data: Path | None = None,
                  evals: list[Path] | None = None, model: str | None = None) -> ReportInputs:
    """A run directory's files (`find_run_inputs`), each overridden by one given; or just those."""
    if run_dir is None:
        if scores is None and not evals:
            raise TossError("report: give a RUN_DIR, or --scores S [--mask M --data D], or --eval E.json")
        return ReportInputs(scores, mask, data, list(evals or []), model)
    inputs = find_run_inputs(run_dir)
    inputs.scores = scores or inputs.scores
    inputs.mask = mask or inputs.mask
    inputs.data = data or inputs.data
    inputs.evals += list(evals or [])
    inputs.model = model or inputs.model
    return inputs


def find_run_inputs(run_dir: str | os.PathLike) -> ReportInputs:
    """The files a run directory holds (see the module docstring for the layout)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TossError(f"{run_dir}: run directory not found")
    inputs = ReportInputs(scores=_shallowest(run_dir, "scores.safetensors"),
                          mask=_shallowest(run_dir, "mask.safetensors"))
    inputs.evals = sorted(p for p in run_dir.rglob("eval*.json")
                          if not any(part.endswith(".parts") for part in p.parts))
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        info = read_json(manifest)
        if isinstance(info, dict):
            if isinstance(info.get("model"), str):
                inputs.model = info["model"]
            if isinstance(info.get("data"), str) and Path(info["data"]).exists():
                inputs.data = Path(info["data"])
    if inputs.scores is None and not inputs.evals:
        raise TossError(f"{run_dir}: no scores.safetensors and no eval*.json inside; nothing to report")
    return inputs


def _meta(meta: dict[str, str]) -> dict[str, Any]:
    """Metadata values were JSON-encoded unless they were strings; decode what decodes."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def read_scores_and_mask(inputs: ReportInputs
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None, dict[str, Any] | None]:
    """The scores' arrays and decoded metadata; the mask's keep array and metadata (or None)."""
    scores = load_scores(inputs.scores)
    keep = mask_meta = None
    if inputs.mask is not None:
        fingerprint = scores.meta if all(k in scores.meta for k in FINGERPRINT_KEYS) else None
        mask = load_mask(inputs.mask, scores.offsets, scores.row_index, fingerprint,
                         f"the scores file {inputs.scores}")
        keep, mask_meta = mask.keep, _meta(mask.meta)
    return scores.arrays(), _meta(scores.meta), keep, mask_meta


def load_report_tokenizer(spec: str, scores_meta: dict[str, Any]):
    """The tokenizer of `spec` (registry name, folder or hub id), checked against the scores."""
    from .data import tokenizer_sha256
    from .models.load import load_tokenizer

    tokenizer = load_tokenizer(spec)
    want = scores_meta.get("tokenizer_sha256")
    if want and tokenizer_sha256(tokenizer) != want:
        raise TossError(f"{spec}: its tokenizer is not the one the scores were made with "
                        "(tokenizer_sha256 differs); pass the scoring model with --model")
    return tokenizer


def read_tags(data: str | os.PathLike, scores_meta: dict[str, Any]) -> dict[int, str]:
    """Row index -> tag (source/label/category/origin) of the data file the scores were made from."""
    want = scores_meta.get("dataset_sha256")
    if want and Path(data).exists() and sha256_file(data) != want:
        raise TossError(f"{data}: not the data file the scores were made from (dataset_sha256 differs)")
    tags = {}
    for row in read_rows(data, skip_bad_rows=True):
        for key in TAG_KEYS:
            value = row.data.get(key)
            if isinstance(value, (str, bool, int)) and not isinstance(value, float):
                tags[row.index] = f"{key}: {value}"
                break
    return tags


# ---------------------------------------------------------------- numbers behind the charts


def token_pieces(tokenizer, ids: list[int] | np.ndarray, window: int = 6) -> list[str]:
    """The text each token adds, so that the pieces join to the decoded text.

    Decoding one token at a time breaks characters split across byte-level
    tokens; the piece of token k is decode(ids[k-w:k+1]) minus decode(ids[k-w:k]),
    where an incomplete UTF-8 tail (U+FFFD) waits for the token that completes it.
    """
    ids = [int(t) for t in ids]
    pieces = []
    for k in range(len(ids)):
        lo = max(0, k - window)
        before = tokenizer.decode(ids[lo:k]).rstrip("\ufffd") if k > lo else ""
        after = tokenizer.decode(ids[lo:k + 1])
        if k + 1 < len(ids):
            after = after.rstrip("\ufffd")
        pieces.append(after[len(before):] if after.startswith(before) else after)
    return pieces


def removal_by_position(response_mask: np.ndarray, keep: np.ndarray, offsets: np.ndarray
                        ) -> list[tuple[str, int, int]]:
    """(bucket label, removed, total) per chart bucket (`layout.CHART_BUCKETS`) that has tokens."""
    removed = response_mask.astype(bool) & ~keep
    return [b for b in layout_removal_by_position(offsets, response_mask, removed, CHART_BUCKETS)
            if b[2]]


def score_histogram(scores: np.ndarray, removed: np.ndarray, threshold: float | None,
                    bins: int = 60) -> tuple[list[float], list[int], list[int]]:
    """Bin edges and kept/removed counts; outliers beyond the 0.5/99.5 percentiles go to the end bins."""
    lo, hi = (float(v) for v in np.percentile(scores, [0.5, 99.5]))
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    if threshold is not None:  # make the threshold a bin edge, so no bar mixes kept and removed
        lo = threshold - math.ceil((threshold - lo) / width - 1e-9) * width
        bins = max(1, math.ceil((hi - lo) / width - 1e-9))
    edges = lo + width * np.arange(bins + 1)
    which = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    kept = np.bincount(which[~removed], minlength=bins)
    gone = np.bincount(which[removed], minlength=bins)
    return edges.tolist(), kept.tolist(), gone.tolist()


def pick_samples(scores: dict[str, np.ndarray], top: int, random_n: int, seed: int
                 ) -> tuple[list[int], list[int]]:
    """The `top` samples with the highest token score, and `random_n` others drawn with `seed`."""
    offsets, resp, s = scores["offsets"], scores["response_mask"].astype(bool), scores["score"]
    n = len(offsets) - 1
    risk = np.full(n, -np.inf)
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        if resp[a:b].any():
            risk[i] = s[a:b][resp[a:b]].max()
    order = [i for i in np.argsort(-risk, kind="stable") if np.isfinite(risk[i])]
    riskiest = [int(i) for i in order[:top]]
    rest = np.array(order[top:], dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(rest, size=min(random_n, len(rest)), replace=False) if len(rest) else rest
    return riskiest, sorted(int(i) for i in drawn)


# ---------------------------------------------------------------- HTML


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f8fafc;color:#1e293b}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{margin-top:36px;border-bottom:2px solid #e2e8f0;padding-bottom:4px}
.sub{color:#64748b} .note{color:#475569;font-size:.92em;max-width:80ch}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:1.25em}
.sample{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px 14px;margin:12px 0}
.sample header{font-size:.9em;color:#475569;margin-bottom:6px}
.tag{background:#ede9fe;color:#5b21b6;border-radius:4px;padding:1px 6px;margin-left:6px}
.text{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:13px;line-height:1.9;
white-space:pre-wrap;word-break:break-word}
.ctx{color:#94a3b8}
.t{border-radius:2px;padding:1px 0}
.t:hover{outline:2px solid #0f172a}
.rm{text-decoration:line-through;text-decoration-thickness:2px;text-decoration-color:#0f172a;
box-shadow:inset 0 -2px 0 #0f172a}
.more{color:#64748b;font-style:italic}
.legend{display:flex;align-items:center;gap:8px;font-size:.9em;margin:8px 0}
.ramp{width:240px;height:14px;border-radius:3px;
background:linear-gradient(90deg,rgba(37,99,235,.85),rgba(255,255,255,1),rgba(220,38,38,.85))}
svg.chart{width:100%;height:auto;background:#fff;border:1px solid #e2e8f0;border-radius:8px}
svg .label{font-size:12px;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:.92em}
th,td{border:1px solid #e2e8f0;padding:5px 9px;text-align:right} th:first-child,td:first-child{text-align:left}
th{background:#f1f5f9} td{white-space:nowrap} .wide{overflow-x:auto}
.pair{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.pair>.chartbox{flex:1 1 480px;min-width:0} .pair>.wide{flex:0 1 auto}
"""


def _colour(s: float, scale: float) -> tuple[str, bool]:
    """Background for score s: red above 0, blue below, alpha by |s| / scale; and whether text goes white."""
    a = min(abs(s) / scale, 1.0) * 0.85 if np.isfinite(s) else 0.0
    rgb = "220,38,38" if s > 0 else "37,99,235"
    return f"rgba({rgb},{a:.2f})", a > 0.55


def _shorten(text: str) -> str:
    if len(text) <= CONTEXT_HEAD + CONTEXT_TAIL + 5:
        return text
    return text[:CONTEXT_HEAD] + " \u2026 " + text[-CONTEXT_TAIL:]


def sample_html(i: int, scores: dict[str, np.ndarray], keep: np.ndarray | None, tokenizer,
                scale: float, tags: dict[int, str]) -> str:
    a, b = int(scores["offsets"][i]), int(scores["offsets"][i + 1])
    ids = scores["token_ids"][a:b]
    resp = scores["response_mask"][a:b].astype(bool)
    s, lu, lh = scores["score"][a:b], scores["loss_utility"][a:b], scores["loss_safety"][a:b]
    removed = resp & ~keep[a:b] if keep is not None else np.zeros(b - a, bool)
    pieces = token_pieces(tokenizer, ids)
    row = int(scores["row_index"][i])
    parts, shown, j = [], 0, 0
    while j < len(ids):
        k = j
        while k < len(ids) and resp[k] == resp[j]:
            k += 1
        if not resp[j]:
            parts.append(f'<span class="ctx">{escape(_shorten("".join(pieces[j:k])))}</span>')
        else:
            for t in range(j, k):
                if shown >= MAX_TOKENS_SHOWN:
                    break
                bg, white = _colour(float(s[t]), scale)
                cls = "t rm" if removed[t] else "t"
                style = f"background:{bg}" + (";color:#fff" if white else "")
                tip = (f"loss_u {lu[t]:.3f} | loss_h {lh[t]:.3f} | S {s[t]:.3f}"
                       + (" | removed" if removed[t] else ""))
                parts.append(f'<span class="{cls}" style="{style}" title="{tip}">'
                             f'{escape(pieces[t])}</span>')
                shown += 1
        j = k
    hidden = int(resp.sum()) - shown
    if hidden > 0:
        parts.append(f'<span class="more"> [{hidden} more response tokens not shown]</span>')
    top = float(s[resp].max()) if resp.any() else float("nan")
    tag = f'<span class="tag">{escape(tags[row])}</span>' if row in tags else ""
    return (f'<article class="sample" data-row="{row}"><header>row {row} &middot; max S {top:.3f} &middot; '
            f'{int(removed.sum())} of {int(resp.sum())} response tokens removed{tag}</header>'
            f'<div class="text">{"".join(parts)}</div></article>')


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{escape(v)}</b>{escape(k)}</div>' for k, v in items) + "</div>"


def _tag_table(tags: dict[int, str], scores: dict[str, np.ndarray], removed: np.ndarray) -> str:
    per = removal_by_group(scores["offsets"], scores["row_index"], scores["response_mask"], removed,
                           tags, "(no tag)")
    total_removed = max(sum(g.removed for g in per.values()), 1)
    total_tokens = max(sum(g.tokens for g in per.values()), 1)
    rows = "".join(
        f"<tr><td>{escape(tag)}</td><td>{g.samples}</td><td>{g.tokens}</td>"
        f"<td>{100 * g.tokens / total_tokens:.1f}%</td><td>{g.removed}</td>"
        f"<td>{100 * g.removed / max(g.tokens, 1):.1f}%</td><td>{100 * g.removed / total_removed:.1f}%</td>"
        f"<td>{g.openings_removed} of {g.openings} ({100 * g.openings_removed / max(g.openings, 1):.0f}%)</td></tr>"
        for tag, g in sorted(per.items()))
    return ("<table><tr><th>tag</th><th>samples</th><th>response tokens</th><th>share of tokens</th>"
            "<th>removed</th><th>removal rate (recall)</th><th>share of removed (precision)</th>"
            "<th>first answer token removed</th></tr>" + rows + "</table>")


def _label_models(evals: list[tuple[Path, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    names = [m["name"] for _, e in evals for m in e.get("models", [])]
    out = []
    for path, e in evals:
        for m in e.get("models", []):
            label = m["name"] if names.count(m["name"]) == 1 else f"{path.parent.name}/{path.stem}/{m['name']}"
            out.append((label, m))
    return out


def safety_utility_html(models: list[tuple[str, dict[str, Any]]]) -> str:
    with_refusal = [(label, m["metrics"]) for label, m in models if "refusal_rate" in m["metrics"]]
    if not with_refusal:
        return '<p class="note">No harmful-prompt evaluation, so no safety-utility chart.</p>'
    for key, xlabel, is_rate in (("exact_match", "exact match (higher is better)", True),
                                 ("nll", "reference NLL (lower is better)", False),
                                 ("over_refusal_rate", "over-refusal on edgy prompts (lower is better)",
                                  True)):
        if all(key in metrics for _, metrics in with_refusal):
            points = [{"label": label, "x": metrics[key]["value"], "x_ci": metrics[key].get("ci95"),
                       "y": metrics["refusal_rate"]["value"], "y_ci": metrics["refusal_rate"]["ci95"]}
                      for label, metrics in with_refusal]
            return scatter_svg(points, xlabel, "refusal rate on harmful prompts", is_rate)
    return '<p class="note">The evaluations share no utility metric, so no safety-utility chart.</p>'


def metrics_table_html(models: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per metric, one column per model; hovering a cell shows its sample count."""
    head = "".join(f"<th>{escape(label)}</th>" for label, _ in models)
    rows = []
    for key, name in metric_rows([m["metrics"] for _, m in models]):
        cells = "".join(
            f'<td title="n = {m["metrics"][key]["n"]}">{escape(format_metric(m["metrics"][key]))}</td>'
            if key in m["metrics"] else "<td>-</td>" for _, m in models)
        rows.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    return (f'<div class="wide"><table class="metrics"><tr><th>metric</th>{head}</tr>'
            f'{"".join(rows)}</table></div>')


# ---------------------------------------------------------------- deep safety (issue 22)


def _pair(svg: str, table: str) -> str:
    return f'<div class="pair"><div class="chartbox">{svg}</div><div class="wide">{table}</div></div>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            + "</table>")


def _cell(metrics: dict[str, Any], key: str) -> str:
    return format_metric(metrics[key]) if key in metrics else "-"


def harmful_sets_html(models: list[tuple[str, dict[str, Any]]], primary: str = "harmful") -> str:
    """Refusal rate on each harmful set (never pooled), one series per model; '' for one set."""
    names = list(dict.fromkeys(k.split(":", 1)[1] for _, m in models for k in m["metrics"]
                               if k.startswith("refusal_rate:")))
    if not names:
        return ""
    keys = (["refusal_rate"] if any("refusal_rate" in m["metrics"] for _, m in models) else []) + [
        f"refusal_rate:{n}" for n in names]
    cats = [primary if k == "refusal_rate" else k.split(":", 1)[1] for k in keys]
    series = [{"label": label, "values": [m["metrics"][k]["value"] if k in m["metrics"] else None
                                          for k in keys],
               "cis": [m["metrics"][k]["ci95"] if k in m["metrics"] else None for k in keys]}
              for label, m in models]
    svg = lines_svg(cats, series, "harmful prompt set", "refusal rate", True, connect=False)
    rows = [[cat] + [_cell(m["metrics"], k) for _, m in models] for cat, k in zip(cats, keys, strict=True)]
    rows.append(["prompts"] + [" / ".join(str(m["metrics"][k]["n"]) if k in m["metrics"] else "-"
                                          for k in keys) for _, m in models])
    return _pair(svg, _table(["set"] + [label for label, _ in models], rows))


def depth_html(models: list[tuple[str, dict[str, Any]]]) -> str:
    """Harmful-answer NLL gap to the base by answer position, one line per model; '' without data."""
    labels = list(dict.fromkeys(k.split("@", 1)[1] for _, m in models for k in m["metrics"]
                                if k.startswith("answer_nll@")))
    if not labels:
        return ""
    with_gap = [(label, m) for label, m in models if any(k.startswith("answer_nll_gap@") for k in m["metrics"])]
    series = [{"label": label, "values": [m["metrics"].get(f"answer_nll_gap@{b}", {}).get("value")
                                          for b in labels]} for label, m in with_gap]
    svg = lines_svg(labels, series, "position in the harmful reference answer (tokens)",
                    "NLL gap to the base (nats)", False)
    head = ["tokens"] + [label for label, _ in models]
    rows = []
    for b in labels:  # compact cells, so the table fits beside the chart: "gap (KL)"
        row = [b]
        for _, m in models:
            gap, kl = (m["metrics"].get(f"{key}@{b}") for key in ("answer_nll_gap", "kl_to_base"))
            row.append((f"{gap['value'] + 0.0:+.3f}" if gap else "-") + (f" ({kl['value']:.3f})" if kl else ""))
        rows.append(row)
    return _pair(svg, _table(head, rows) + '<p class="note">NLL gap to the base, nats (KL to the base); '
                 "the NLL itself is in the metrics table.</p>")


def prefill_html(models: list[tuple[str, dict[str, Any]]]) -> str:
    """Prefill recovery rate against K, one line per model; '' without a prefilling attack."""
    ks = sorted({int(k.split("@", 1)[1]) for _, m in models for k in m["metrics"]
                 if k.startswith("prefill_recovery@")})
    if not ks:
        return ""
    series = [{"label": label,
               "values": [m["metrics"].get(f"prefill_recovery@{k}", {}).get("value") for k in ks],
               "cis": [m["metrics"].get(f"prefill_recovery@{k}", {}).get("ci95") for k in ks]}
              for label, m in models]
    svg = lines_svg([str(k) for k in ks], series, "answer tokens prefilled (K)",
                    "recovery rate (continuation refuses)", True)
    rows = [[str(k)] + [_cell(m["metrics"], f"prefill_recovery@{k}") for _, m in models] for k in ks]
    return _pair(svg, _table(["K"] + [label for label, _ in models], rows)
                 + '<p class="note">Recovery rate (Wilson 95%); the continuation rates are in the '
                 "metrics table.</p>")


def deep_safety_sections(models: list[tuple[str, dict[str, Any]]], primary: str = "harmful") -> list[str]:
    out = []
    if sets := harmful_sets_html(models, primary):
        out += ["<h2>Refusal by harmful prompt set</h2>",
                '<p class="note">Each set of harmful prompts apart, never pooled (keyword matcher, '
                "Wilson 95% intervals): a model can look safe on one phrasing and not on another.</p>",
                sets]
    if prefill := prefill_html(models):
        out += ["<h2>Prefilling attack</h2>",
                '<p class="note">The answer is started with the first K tokens of a harmful reference '
                "answer; recovery is the share of continuations that turn back to a refusal (keyword "
                "matcher on the continuation only), with Wilson 95% intervals. Shallow safety "
                "recovers rarely once K tokens are forced.</p>", prefill]
    if depth := depth_html(models):
        out += ["<h2>Safety depth: harmful-answer likelihood by position</h2>",
                '<p class="note">Mean per-token NLL of the harmful reference answers by position '
                "bucket, minus the base model's on the same tokens, and the mean KL(model || base) of "
                "the next-token distributions there. A negative gap past the first tokens: the model "
                "learned the harmful content beyond the opening.</p>", depth]
    return out


def build_report(inputs: ReportInputs, out: str | os.PathLike, top: int = 20, random_n: int = 20,
                 seed: int = 0, title: str = "TOSS report", tokenizer=None) -> dict[str, Any]:
    """Write the HTML report; return a few of its numbers (for the CLI's summary line)."""
    from .checks import check_writable

    check_writable(out, "report file")
    body, summary = [], {}
    scores = meta = keep = mask_meta = None
    if inputs.scores is None and (inputs.mask is not None or inputs.data is not None):
        raise TossError("--mask and --data need the --scores they belong to")
    if inputs.scores is not None:
        scores, meta, keep, mask_meta = read_scores_and_mask(inputs)
    evals = []
    for path in inputs.evals:
        e = read_json(path)
        if not isinstance(e, dict) or not isinstance(e.get("models"), list):
            raise TossError(f"{path}: not an eval.json from `toss-mlx eval` (no 'models' list)")
        evals.append((Path(path), e))
    if scores is None and not evals:
        raise TossError("nothing to report: give a run directory, --scores or --eval")

    body.append(f"<h1>{escape(title)}</h1>")
    if scores is not None:
        spec = inputs.model or meta.get("model")
        if tokenizer is None:
            if not spec:
                raise TossError(f"{inputs.scores}: no model recorded in the scores; pass --model "
                                "so that token ids can be shown as text")
            tokenizer = load_report_tokenizer(str(spec), meta)
        tags = read_tags(inputs.data, meta) if inputs.data else {}
        body += _scores_sections(scores, meta, keep, mask_meta, tokenizer, tags, top, random_n,
                                 seed, summary)
    if evals:
        models = _label_models(evals)
        body.append("<h2>Safety and utility</h2>")
        body.append('<p class="note">Refusal rate on harmful prompts (keyword matcher, phrase anywhere '
                    "in the answer) against utility, with Wilson 95% intervals. Up and to the "
                    "good side of the utility axis is better.</p>")
        body.append(safety_utility_html(models))
        primary = next((e.get("settings", {}).get("harmful_name") for _, e in evals
                        if e.get("settings", {}).get("harmful_name")), "harmful")
        body += deep_safety_sections(models, primary)
        body.append("<h2>All metrics</h2>")
        body.append('<p class="note">Rates with Wilson 95% intervals; hover a cell for its sample count. '
                    f'From: {escape(", ".join(str(p) for p, _ in evals))}.</p>')
        body.append(metrics_table_html(models))
        summary["models_evaluated"] = len(models)
    html = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(body) + "</main></body></html>\n")
    write_text(out, html)
    summary["bytes"] = len(html.encode())
    return summary


def _scores_sections(scores, meta, keep, mask_meta, tokenizer, tags, top, random_n, seed,
                     summary) -> list[str]:
    resp = scores["response_mask"].astype(bool)
    s = scores["score"]
    removed = resp & ~keep if keep is not None else np.zeros(len(resp), bool)
    n_resp, n_removed = int(resp.sum()), int(removed.sum())
    strategy = (mask_meta or {}).get("strategy", "toss")
    level = (mask_meta or {}).get("level", "global")
    threshold = float(s[removed].min()) if n_removed and strategy == "toss" and level == "global" else None
    scale = float(np.percentile(np.abs(s[resp]), 99)) if n_resp else 1.0
    scale = scale if scale > 1e-6 else 1.0
    summary.update(samples=len(scores["row_index"]), response_tokens=n_resp, removed_tokens=n_removed)

    out = [f'<p class="sub">model {escape(str(meta.get("model", "?")))} &middot; template '
           f'{escape(str(meta.get("template", "?")))} &middot; scores {escape(str(meta.get("dataset_sha256", ""))[:12])}</p>']
    cards = [("samples", f"{len(scores['row_index']):,}"), ("response tokens", f"{n_resp:,}")]
    if keep is not None:
        cards += [("tokens removed", f"{n_removed:,} ({100 * n_removed / max(n_resp, 1):.1f}%)"),
                  ("strategy", f"{strategy} / {level}"),
                  ("threshold S", f"{threshold:.3f}" if threshold is not None else "-")]
    cards.append(("mean S", f"{float(s[resp].mean()):.3f}" if n_resp else "-"))
    out.append(_cards(cards))

    riskiest, drawn = pick_samples(scores, top, random_n, seed)
    out.append('<h2 id="heatmap">Token heatmap</h2>')
    out.append('<div class="legend"><span>low S (safe)</span><span class="ramp"></span>'
               f'<span>high S (unsafe)</span><span class="sub">&plusmn;{scale:.2f} = full colour; '
               '<span class="rm">struck through</span> = removed from the loss; hover a token for '
               "loss_u, loss_h and S. Grey: prompt context (shortened).</span></div>")
    out.append(f'<section class="heatmap"><h3>Riskiest {len(riskiest)} samples (highest token score)</h3>')
    out += [sample_html(i, scores, keep, tokenizer, scale, tags) for i in riskiest]
    out.append(f"<h3>Random {len(drawn)} of the other samples (seed {seed})</h3>")
    out += [sample_html(i, scores, keep, tokenizer, scale, tags) for i in drawn]
    out.append("</section>")

    out.append("<h2>Score distribution</h2>")
    note = ("the dashed line is the selection threshold, the lowest score removed"
            if threshold is not None else
            f"strategy {strategy} / {level} removes tokens without one global threshold"
            if keep is not None else "no mask given")
    out.append(f'<p class="note">S = loss_u - loss_h over all {n_resp:,} response tokens; {note}. '
               "Scores beyond the 0.5th and 99.5th percentiles are counted in the end bins.</p>")
    if n_resp:
        out.append(histogram_svg(*score_histogram(s[resp], removed[resp], threshold), threshold))

    if keep is not None and n_resp:
        buckets = removal_by_position(scores["response_mask"], keep, scores["offsets"])
        out.append("<h2>Removal by position in the response</h2>")
        out.append('<p class="note">Share of tokens removed at each position of an answer (1 = its '
                   "first token). Fixed-position defenses mask only the first tokens; TOSS removes "
                   "where the scores point, which concentrates early but not only there.</p>")
        out.append(bars_svg([b[0] for b in buckets], [b[1] / b[2] for b in buckets],
                            [(b[1], b[2]) for b in buckets], n_removed / n_resp,
                            "position in the response (tokens)", "removal rate"))
        if tags:
            out.append("<h2>Removal by data tag</h2>")
            out.append(_tag_table(tags, scores, removed))
    return out
