"""`toss-mlx report`: the numbers behind each chart against naive loops, input checks, the
self-contained HTML, and the page rendered in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import toss_mlx  # noqa: F401  (BLAS before mlx)
from toss_mlx import report as rp
from toss_mlx.data import tokenize_dataset
from toss_mlx.io import TossError, save_arrays
from toss_mlx.layout import CHART_BUCKETS, answer_positions, load_scores

RATIO = 0.1


def make_run(folder: Path, tokenizer, model_dir: Path, n: int = 30, seed: int = 0) -> dict[str, Path]:
    """Data with tags, scores and a global top-10% mask in the layout `score`/`select` write."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"What is the capital of France? Question {i}",
             "completion": "The capital of France is Paris. Caf\u00e9 na\u00efve \u2615 ok." * (1 + i % 3),
             "source": "harmful" if i % 4 == 0 else "benign"} for i in range(n)]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tokenize_dataset(data, tokenizer)
    flat = tok.flat()
    rng = np.random.default_rng(seed)
    total = len(flat["token_ids"])
    resp = flat["response_mask"].astype(bool)
    loss_u = rng.gamma(2.0, 1.0, total).astype(np.float32)
    loss_h = rng.gamma(2.0, 1.0, total).astype(np.float32)
    score = np.where(resp, loss_u - loss_h, 0).astype(np.float32)
    save_arrays(folder / "scores.safetensors",
                dict(flat, loss_utility=loss_u, loss_safety=loss_h, score=score),
                dict(tok.fingerprint, model=str(model_dir), format_version=1,
                     utility_adapter_sha256="u" * 64, safety_adapter_sha256="h" * 64))
    k = int(RATIO * resp.sum())
    order = np.argsort(-np.where(resp, score, -np.inf), kind="stable")
    keep = resp.copy()
    keep[order[:k]] = False
    save_arrays(folder / "mask.safetensors",
                {"offsets": flat["offsets"], "row_index": flat["row_index"], "keep": keep.astype(np.uint8)},
                dict(tok.fingerprint, strategy="toss", level="global", ratio=RATIO, removed_tokens=k))
    return {"data": data, "scores": folder / "scores.safetensors", "mask": folder / "mask.safetensors"}


def make_eval(path: Path, names_metrics: list[tuple[str, dict]]) -> Path:
    from toss_mlx.evaluate import rate

    models = []
    for name, (refused, correct, nll) in names_metrics:
        models.append({"name": name, "adapter": None, "metrics": {
            "refusal_rate": rate(refused, 20), "exact_match": rate(correct, 10),
            "nll": {"value": nll, "n": 10, "tokens": 300}}, "prompts": {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format_version": 1, "model": "tiny", "models": models}))
    return path


@pytest.fixture()
def run(tmp_path, tokenizer, tiny_model_dir):
    files = make_run(tmp_path / "run", tokenizer, tiny_model_dir)
    files["eval"] = make_eval(tmp_path / "run" / "eval.json",
                              [("base", (18, 3, 2.1)), ("sft", (4, 6, 1.5)), ("toss", (15, 6, 1.6))])
    return files


def load(files):
    return rp.read_scores_and_mask(rp.ReportInputs(scores=files["scores"], mask=files["mask"]))


# ---------------------------------------------------------------- the numbers


def test_token_pieces_join_to_the_decoded_text(tokenizer):
    text = "Caf\u00e9 na\u00efve \u2615 \U0001F600 Paris, 72!"
    ids = tokenizer._tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())
    pieces = rp.token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # one-token-at-a-time decoding, the naive way, would have broken the multi-byte characters
    assert "".join(tokenizer.decode([t]) for t in ids) != text


def test_positions_and_removal_by_position_against_a_naive_loop(run):
    scores, _, keep, _ = load(run)
    offsets, resp = scores["offsets"], scores["response_mask"].astype(bool)
    want = np.zeros(len(resp), np.int64)
    for i in range(len(offsets) - 1):
        pos = 0
        for j in range(offsets[i], offsets[i + 1]):
            pos = pos + 1 if resp[j] else 0
            want[j] = pos
    got = answer_positions(offsets, scores["response_mask"]) + 1  # 1-based, 0 outside answers
    np.testing.assert_array_equal(got, want)
    buckets = rp.removal_by_position(scores["response_mask"], keep, offsets)
    naive: dict[str, list[int]] = {}
    for j in np.nonzero(resp)[0]:
        p = want[j]
        label, lo, hi = next(b for b in CHART_BUCKETS if p >= b[1] and (b[2] is None or p <= b[2]))
        assert label == (str(lo) if lo == hi else (f"{lo}-{hi}" if hi else f"{lo}+"))
        entry = naive.setdefault(label, [0, 0])
        entry[0] += int(not keep[j])
        entry[1] += 1
    assert {label: [r, t] for label, r, t in buckets} == naive
    assert sum(t for _, _, t in buckets) == resp.sum()
    assert sum(r for _, r, _ in buckets) == int((resp & ~keep).sum())


def test_positions_restart_at_each_sample_even_without_a_prompt_between():
    mask = np.array([1, 1, 1, 1, 0, 1, 1], np.uint8)
    offsets = np.array([0, 2, 7])
    np.testing.assert_array_equal(answer_positions(offsets, mask) + 1, [1, 2, 1, 2, 0, 1, 2])


def test_score_histogram_against_a_naive_loop(run):
    scores, _, keep, _ = load(run)
    resp = scores["response_mask"].astype(bool)
    values, removed = scores["score"][resp], (~keep)[resp]
    threshold = float(values[removed].min())
    edges, kept_counts, removed_counts = rp.score_histogram(values, removed, threshold)
    assert min(abs(e - threshold) for e in edges) < 1e-9  # the threshold is a bin edge
    nb = len(edges) - 1
    want_kept, want_removed = [0] * nb, [0] * nb
    for v, r in zip(values, removed, strict=True):
        b = 0
        while b + 1 < nb and v >= edges[b + 1]:
            b += 1
        (want_removed if r else want_kept)[b] += 1
    assert kept_counts == want_kept and removed_counts == want_removed
    # no bar mixes kept and removed tokens
    assert not any(k and r for k, r in zip(kept_counts, removed_counts, strict=True))


def test_pick_samples(run):
    scores, *_ = load(run)
    offsets, resp, s = scores["offsets"], scores["response_mask"].astype(bool), scores["score"]
    risk = [s[offsets[i]:offsets[i + 1]][resp[offsets[i]:offsets[i + 1]]].max()
            for i in range(len(offsets) - 1)]
    riskiest, drawn = rp.pick_samples(scores, 5, 7, seed=0)
    assert riskiest == sorted(range(len(risk)), key=lambda i: -risk[i])[:5]
    assert len(drawn) == 7 and not set(drawn) & set(riskiest)
    assert rp.pick_samples(scores, 5, 7, seed=0)[1] == drawn
    assert rp.pick_samples(scores, 5, 7, seed=1)[1] != drawn
    assert rp.pick_samples(scores, 25, 100, seed=0)[1].__len__() == 5  # only 30 samples


# ---------------------------------------------------------------- bad input


def test_mask_and_scores_must_belong_together(run, tmp_path):
    def load_mask(path, *_):
        return rp.read_scores_and_mask(rp.ReportInputs(scores=run["scores"], mask=path))

    from toss_mlx.io import load_arrays

    mask, mask_meta = load_arrays(run["mask"])
    other = tmp_path / "other-mask.safetensors"
    save_arrays(other, mask, dict(mask_meta, template="plain"))
    with pytest.raises(TossError, match="template"):
        load_mask(other)
    shifted = dict(mask, row_index=mask["row_index"] + 1)
    save_arrays(other, shifted, mask_meta)
    with pytest.raises(TossError, match="other samples"):
        load_mask(other)
    save_arrays(other, {"offsets": mask["offsets"], "row_index": mask["row_index"]}, mask_meta)
    with pytest.raises(TossError, match="missing arrays keep"):
        load_mask(other)
    broken = dict(mask, offsets=mask["offsets"][::-1].copy())
    save_arrays(other, broken, mask_meta)
    with pytest.raises(TossError, match="offsets"):
        load_mask(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(TossError, match="not a readable safetensors"):
        load_scores(junk)


def test_wrong_tokenizer_and_wrong_data_are_refused(run, tmp_path, tiny_model_dir):
    meta = load_scores(run["scores"]).meta
    with pytest.raises(TossError, match="tokenizer"):
        rp.load_report_tokenizer(str(tiny_model_dir), dict(meta, tokenizer_sha256="0" * 64))
    rp.load_report_tokenizer(str(tiny_model_dir), meta)  # the right one loads
    other = tmp_path / "other.jsonl"
    other.write_text(run["data"].read_text() + '{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(TossError, match="dataset_sha256"):
        rp.read_tags(other, meta)
    with pytest.raises(TossError, match="need the --scores"):
        rp.build_report(rp.ReportInputs(mask=run["mask"]), tmp_path / "r.html")


def test_find_run_inputs(tmp_path, run):
    root = run["scores"].parent
    (root / "round-1").mkdir()
    shutil.copy(run["scores"], root / "round-1" / "scores.safetensors")
    make_eval(root / "evals" / "eval-toss.json", [("toss", (10, 5, 1.0))])
    (root / "eval.json.parts").mkdir()
    (root / "eval.json.parts" / "eval-part.json").write_text("{}")
    (root / "manifest.json").write_text(json.dumps({"model": "my-model", "data": str(run["data"])}))
    found = rp.find_run_inputs(root)
    assert found.scores == root / "scores.safetensors" and found.mask == root / "mask.safetensors"
    assert found.evals == [root / "eval.json", root / "evals" / "eval-toss.json"]
    assert (found.model, found.data) == ("my-model", run["data"])
    (root / "scores.safetensors").unlink()
    (root / "round-2").mkdir()
    shutil.copy(run["mask"], root / "round-2" / "scores.safetensors")
    with pytest.raises(TossError, match="several scores.safetensors"):
        rp.find_run_inputs(root)
    with pytest.raises(TossError, match="not found"):
        rp.find_run_inputs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TossError, match="nothing to report"):
        rp.find_run_inputs(tmp_path / "empty")


# ---------------------------------------------------------------- the HTML


class Spans(HTMLParser):
    """Collects the heatmap tokens: (row, classes, title, text) of every span.t."""

    def __init__(self):
        super().__init__()
        self.row, self.tokens, self._open = None, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article":
            self.row = int(a["data-row"])
        if tag == "span" and "t" in a.get("class", "").split():
            self._open = [self.row, a["class"].split(), a.get("title", ""), ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[3] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.tokens.append(tuple(self._open))
            self._open = None


def test_report_html(run, tmp_path, tokenizer):
    out = tmp_path / "report.html"
    inputs = rp.ReportInputs(run["scores"], run["mask"], run["data"], [run["eval"]])
    summary = rp.build_report(inputs, out, top=4, random_n=3, seed=0)
    html = out.read_text()
    scores, _, keep, _ = load(run)
    resp = scores["response_mask"].astype(bool)
    assert summary["removed_tokens"] == int((resp & ~keep).sum()) == int(RATIO * resp.sum())
    # self-contained: nothing to fetch, nothing to run
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|src=|href=", html, re.I)
    assert not re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", html).count("http")
    # the heatmap shows exactly the picked samples, every response token with its numbers
    parser = Spans()
    parser.feed(html)
    riskiest, drawn = rp.pick_samples(scores, 4, 3, seed=0)
    rows = [int(scores["row_index"][i]) for i in riskiest + drawn]
    assert list(dict.fromkeys(t[0] for t in parser.tokens)) == rows
    for i in riskiest + drawn:
        a, b = scores["offsets"][i], scores["offsets"][i + 1]
        row = int(scores["row_index"][i])
        shown = [t for t in parser.tokens if t[0] == row]
        idx = [j for j in range(a, b) if resp[j]]
        assert len(shown) == len(idx)
        for (_, classes, title, _), j in zip(shown, idx, strict=True):
            assert ("rm" in classes) == (not keep[j])
            assert title.startswith(f"loss_u {scores['loss_utility'][j]:.3f} | loss_h "
                                    f"{scores['loss_safety'][j]:.3f} | S {scores['score'][j]:.3f}")
        assert "".join(t[3] for t in shown) == tokenizer.decode(scores["token_ids"][idx].tolist())
    # the charts and the tables
    assert html.count("<svg") == 3  # histogram, positions, safety-utility
    assert "threshold" in html and "removal rate (recall)" in html and "source: harmful" in html
    # first answer token removed, counted by hand per tag (every sample here has one turn)
    tags = {i: ("harmful" if i % 4 == 0 else "benign") for i in range(30)}
    for tag in ("harmful", "benign"):
        firsts = [next(j for j in range(scores["offsets"][i], scores["offsets"][i + 1]) if resp[j])
                  for i in range(len(scores["row_index"])) if tags[int(scores["row_index"][i])] == tag]
        gone = sum(1 for j in firsts if not keep[j])
        assert f"<td>{gone} of {len(firsts)} ({100 * gone / len(firsts):.0f}%)</td>" in html
    assert "exact match (higher is better)" in html
    for name in ("base", "sft", "toss"):
        assert f"<th>{name}</th>" in html


def test_eval_only_report_and_cli(run, tmp_path, tiny_model_dir):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    only = tmp_path / "only.html"
    result = runner.invoke(app, ["report", "--eval", str(run["eval"]), "--out", str(only)])
    assert result.exit_code == 0, result.output
    html = only.read_text()
    assert "Safety and utility" in html and 'id="heatmap"' not in html
    full = tmp_path / "full.html"
    result = runner.invoke(app, ["report", str(run["scores"].parent), "--data", str(run["data"]),
                                 "--model", str(tiny_model_dir), "--out", str(full), "--top", "2"])
    assert result.exit_code == 0, result.output
    assert "removed tokens" in result.output and 'id="heatmap"' in full.read_text()
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "none.html")])
    assert result.exit_code == 2 and "error:" in result.output


# ---------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,1000"]


def _browser(profile: Path):
    """Headless Chromium through chromedriver, or skip with the reason."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium is not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_in_headless_chromium(run, tmp_path):
    from selenium.webdriver.common.by import By

    out = tmp_path / "report.html"
    rp.build_report(rp.ReportInputs(run["scores"], run["mask"], run["data"], [run["eval"]]), out,
                    top=5, random_n=5)
    # A page with a script error, a console.error and a missing file: the checks must see all three.
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>'
                      'console.error("seen-console-error"); throw new Error("seen-exception");'
                      "</script></body></html>")
    profile = tmp_path / "profile"
    profile.mkdir()
    browser = _browser(profile)
    try:
        browser.get(broken.as_uri())
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert any("seen-console-error" in e for e in errors)
        assert any("seen-exception" in e for e in errors)
        assert any("missing.png" in e for e in errors)

        browser.get(out.as_uri())
        assert browser.execute_script("return document.readyState") == "complete"
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
        heatmap = browser.find_element(By.ID, "heatmap")
        tokens = browser.find_elements(By.CSS_SELECTOR, "section.heatmap span.t")
        removed = browser.find_elements(By.CSS_SELECTOR, "section.heatmap span.t.rm")
        assert heatmap.is_displayed() and len(tokens) > 100 and 0 < len(removed) < len(tokens)
        first = tokens[0]
        assert first.size["width"] > 0 and first.get_attribute("title").startswith("loss_u ")
        assert "line-through" in first.value_of_css_property("text-decoration") or \
            "line-through" in removed[0].value_of_css_property("text-decoration")
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 3
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(height, 8000))
        shot = tmp_path / "report.png"
        browser.save_screenshot(str(shot))
        width, shot_height = _png_size(shot)
        assert width >= 1000 and shot_height >= 1000
        if keep_at := os.environ.get("TOSS_MLX_REPORT_SCREENSHOT"):  # for a person to look at
            shutil.copy(shot, keep_at)
    finally:
        browser.quit()


# ---------------------------------------------------------------- deep safety (issue 22)

DEPTH_BUCKETS = ("1-5", "6-20", "21-80", "81+")


def make_depth_eval(path: Path) -> Path:
    """An eval.json with several harmful sets, a prefilling attack and NLL/KL by position."""
    from toss_mlx.evaluate import rate

    models = []
    for i, name in enumerate(("base", "sft", "toss")):
        m = {"refusal_rate": rate(18 - 6 * i, 20), "refusal_rate:dna": rate(10 - i, 30),
             "refusal_rate:past": rate(3 + i, 25), "exact_match": rate(5, 10)}
        for k, rec in zip((5, 10, 20), (12, 8, 4), strict=True):
            m[f"prefill_recovery@{k}"] = rate(max(rec - 3 * i, 0), 16)
            m[f"prefill_continuation@{k}"] = rate(16 - max(rec - 3 * i, 0), 16)
        for j, b in enumerate(DEPTH_BUCKETS):
            m[f"answer_nll@{b}"] = {"value": 2.0 + j - 0.3 * i * j, "n": 16, "tokens": 80}
            m[f"answer_nll_gap@{b}"] = {"value": -0.3 * i * j if i else 0.0, "n": 16, "tokens": 80}
            if i:
                m[f"kl_to_base@{b}"] = {"value": 0.1 * i + 0.01 * j, "n": 16, "tokens": 80}
        models.append({"name": name, "adapter": None, "metrics": m, "prompts": {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format_version": 1, "model": "tiny", "settings": {"harmful_name": "advbench"},
                                "models": models}))
    return path


class Circles(HTMLParser):
    """Every chart point's hover title, per chart."""

    def __init__(self):
        super().__init__()
        self.charts: list[list[str]] = []
        self.in_circle = False

    def handle_starttag(self, tag, attrs):
        if tag == "svg":
            self.charts.append([])
        if tag != "title":
            self.in_circle = tag == "circle"

    def handle_data(self, data):
        if self.in_circle and self.charts:
            self.charts[-1].append(data)

    def handle_endtag(self, tag):
        if tag in ("circle", "title"):
            self.in_circle = False


def test_deep_safety_charts_and_tables(tmp_path):
    e = make_depth_eval(tmp_path / "eval.json")
    out = tmp_path / "report.html"
    rp.build_report(rp.ReportInputs(evals=[e]), out)
    html = out.read_text()
    assert html.count("<svg") == 4  # safety-utility, harmful sets, prefill, depth
    for title in ("Refusal by harmful prompt set", "Prefilling attack", "Safety depth"):
        assert title in html
    parser = Circles()
    parser.feed(html)
    sets, prefill, depth = parser.charts[1:]
    # every model's point on every set, with its own rate
    assert len(sets) == 9 and "sft, dna: refusal rate 30.0%" in sets  # 9 of 30
    assert "toss, advbench: refusal rate 30.0%" in sets  # 6 of 20
    assert len(prefill) == 9 and "toss, 10: recovery rate (continuation refuses) 12.5%" in prefill
    assert len(depth) == 12 and "toss, 81+: NLL gap to the base (nats) -1.8" in depth
    assert html.count("<polyline") == 6  # prefill and depth: one line per model; sets: points only
    # the tables beside the charts
    assert "<td>advbench</td>" in html and "<td>45.0% [13-94]</td>" not in html
    assert "<td>30.0% [17-48]</td>" in html  # sft on dna: 9/30, Wilson 95%
    depth_table = html[html.index("Safety depth"):html.index("All metrics")]
    assert "<tr><td>81+</td><td>+0.000</td><td>-0.900 (0.130)</td><td>-1.800 (0.230)</td></tr>" in depth_table
    assert "<tr><td>1-5</td><td>+0.000</td><td>+0.000 (0.100)</td><td>+0.000 (0.200)</td></tr>" in depth_table
    prefill_table = html[html.index("Prefilling attack"):html.index("Safety depth")]
    assert "<tr><td>10</td><td>50.0% [28-72]</td><td>31.2% [14-56]</td><td>12.5% [3-36]</td></tr>" in prefill_table


def test_no_deep_safety_sections_without_their_metrics(run, tmp_path):
    out = tmp_path / "report.html"
    rp.build_report(rp.ReportInputs(evals=[run["eval"]]), out)
    html = out.read_text()
    assert html.count("<svg") == 1 and "Prefilling attack" not in html and "Safety depth" not in html


def test_deep_safety_charts_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By

    out = tmp_path / "report.html"
    rp.build_report(rp.ReportInputs(evals=[make_depth_eval(tmp_path / "eval.json")]), out)
    profile = tmp_path / "profile"
    profile.mkdir()
    browser = _browser(profile)
    try:
        browser.get(out.as_uri())
        assert browser.execute_script("return document.readyState") == "complete"
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
        charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert len(charts) == 4
        for chart in charts[1:]:
            assert chart.is_displayed() and chart.size["width"] > 300 and chart.size["height"] > 100
            # each chart has its table beside it, on the same row at this width
            table = chart.find_element(By.XPATH, "./ancestor::div[@class='pair']//table")
            assert table.is_displayed() and table.location["x"] > chart.location["x"] + 300
            assert abs(table.location["y"] - chart.location["y"]) < 60
        # the points are drawn inside their plot, where their values put them
        for circle in browser.find_elements(By.CSS_SELECTOR, "svg.chart circle"):
            assert circle.size["width"] > 0
        lines = browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")
        assert len(lines) == 6 and all(line.size["width"] > 100 for line in lines)
    finally:
        browser.quit()
