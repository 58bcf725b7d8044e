"""The whole method from one recipe: `toss-mlx run RECIPE.yaml`.

Stages, in order (each writes into RUN_DIR/<stage>/):
  prepare   build the data files from packaged data sets (when `data.prepare` is set)
  utility   train the utility-oriented reference adapter on `data.utility`
  safety    train the safety-degraded reference adapter on `data.harmful`
  refine    TOSS-Pro rounds (when `toss.rounds > 0`): grow the harmful set, retrain safety
  score     score every response token of `data.custom` with both references
  select    keep_mask: drop the top `toss.ratio` share of tokens
  final     train the final adapter on the kept tokens
  eval      safety and utility of the base and the final adapter (when eval data is given)
  report    report.html: token heatmap, score histogram, position plot, metrics
  export    the final adapter in `export.format` (PEFT by default)

RUN_DIR/manifest.json records, for every stage, a key (a hash of its settings
and of the files it reads) and what it wrote. Running again skips a stage whose
key is unchanged and whose outputs exist, so changing `toss.ratio` reruns only
select, final, eval, report and export. A stage killed midway is started again
with resume on: the trainer and the scorer pick up where they stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checks import check_writable, hold
from .config import build_config, merge, parse_overrides, read_yaml
from .data import check_text_files
from .io import TossError, read_json, sha256_bytes, sha256_file, write_json, write_text
from .models.lora import LoraSettings

STAGES = ("prepare", "utility", "safety", "refine", "score", "select", "final", "eval",
          "report", "export")


# ---------------------------------------------------------------- the recipe


@dataclass
class DataFiles:
    prepare: Literal["quickstart"] | None = None  # build the files below from packaged data sets
    prepare_sizes: dict[str, int] = field(default_factory=dict)  # sizes for the prepare step
    custom: str = "custom.jsonl"  # the custom fine-tuning data to make safe
    harmful: str = "harmful_ref.jsonl"  # harmful question/answer pairs (safety-degraded reference)
    utility: str = "utility_ref.jsonl"  # task data (utility-oriented reference)
    valid: str | None = None  # validation data for the final fine-tune
    eval_harmful: str | None = "eval_harmful.jsonl"  # harmful prompts: refusal rate
    eval_edgy: str | None = "eval_edgy.jsonl"  # benign but edgy prompts: over-refusal
    eval_task: str | None = "eval_task.jsonl"  # held-out task problems with answers: utility
    eval_prefill: str | None = None  # harmful prompt + answer pairs: prefill attack, NLL/KL by position
    eval_harmful_sets: dict[str, str] = field(default_factory=dict)  # more harmful sets: name -> file


@dataclass
class TossSettings:
    ratio: float = 0.1  # share of response tokens removed from the loss (paper: 0.1)
    level: Literal["global", "sample"] = "global"
    strategy: str = "toss"
    rounds: int = 0  # TOSS-Pro rounds; 0: plain TOSS
    k: int = 10  # samples added to the harmful set per round
    retrain: Literal["scratch", "continue"] = "scratch"
    batch_tokens: int = 4096  # scorer's token budget per batch
    seed: int = 0


@dataclass
class EvalOptions:
    max_new_tokens: int = 128
    decode: Literal["greedy", "sample"] = "greedy"
    batch_size: int = 8
    judge: str | None = None


@dataclass
class Recipe:
    name: str = "toss-run"
    model: str = "smollm2-135m-instruct"
    template: Literal["chat", "plain"] = "chat"
    max_seq_len: int = 2048
    seed: int = 42
    data: DataFiles = field(default_factory=DataFiles)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: dict[str, Any] = field(default_factory=dict)  # settings of `toss-mlx train` (final)
    reference: dict[str, Any] = field(default_factory=dict)  # overrides for the two references
    toss: TossSettings = field(default_factory=TossSettings)
    eval: EvalOptions = field(default_factory=EvalOptions)
    # One format or a list (`export: [peft, gguf]`); the GGUF ones are written from `model`.
    export: list[Literal["peft", "mlx", "gguf", "gguf-lora", "ollama", "none"]] = field(
        default_factory=lambda: ["peft"])

    def __post_init__(self) -> None:
        if not 0 < self.toss.ratio < 1:
            raise ValueError(f"toss.ratio must be in (0, 1), got {self.toss.ratio}")
        if self.toss.rounds < 0:
            raise ValueError(f"toss.rounds must be 0 or more, got {self.toss.rounds}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read and validate a recipe; every problem is reported at once, before any compute."""
    from .train import TrainSettings

    path = Path(path)
    raw = merge(read_yaml(path), parse_overrides(overrides or []))
    problems: list[str] = []

    def collect(fn: Callable[[], Any], prefix: str = "") -> Any:
        try:
            return fn()
        except TossError as e:
            problems.extend(prefix + line.strip() for line in str(e).splitlines()[1:] or [str(e)])
            return None

    recipe = collect(lambda: build_config(Recipe, raw, source=str(path)))
    for key in ("train", "reference"):  # checked as `toss-mlx train` would check them
        extra = raw.get(key) or {}
        if isinstance(extra, dict):
            collect(lambda extra=extra, key=key: build_config(TrainSettings, {"model": "m", "data": "d"},
                                                     extra, source=key), f"{key}.")
    base = path.parent
    files = {**{f.name: f.default for f in dataclasses.fields(DataFiles)}, **(raw.get("data") or {})}
    if not files.get("prepare"):
        for name, value in files.items():
            if name.startswith("prepare") or not isinstance(value, str):
                continue
            if not (base / value).exists():
                problems.append(f"data.{name}: {base / value} not found")
    if problems:
        raise TossError(f"{path}: invalid recipe:\n  " + "\n  ".join(problems))
    return recipe, base


def _train_settings(recipe: Recipe, extra: dict[str, Any], base: Path, data: str, out: str,
                    **more: Any):
    from .train import TrainSettings

    layer = {"model": recipe.model, "template": recipe.template, "max_seq_len": recipe.max_seq_len,
             "seed": recipe.seed, "lora": dataclasses.asdict(recipe.lora)}
    layer.update({"data": data, "out": out, "quiet": True})
    return build_config(TrainSettings, layer, recipe.train if extra is recipe.reference else {},
                        extra, more, source="recipe")


# ---------------------------------------------------------------- the manifest


def fingerprint_path(path: str | Path) -> str:
    """A hash of a file, or of the files of a folder (an adapter)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return sha256_bytes("".join(f"{f.relative_to(p)}:{sha256_file(f)}\n" for f in files))
    return sha256_file(p)


class Manifest:
    """RUN_DIR/manifest.json: each stage's key, inputs and outputs."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "manifest.json"
        self.data = read_json(self.path) if self.path.exists() else {"stages": {}}

    def done(self, stage: str, key: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry and entry.get("key") == key and entry.get("status") == "done"
                    and all(Path(p).exists() for p in entry.get("outputs", {}).values()))

    def started_with(self, stage: str, key: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry and entry.get("key") == key)

    def describe(self, **info: Any) -> None:
        self.data.update(info)
        write_json(self.path, self.data)

    def record(self, stage: str, **entry: Any) -> None:
        self.data["stages"][stage] = {**self.data["stages"].get(stage, {}), **entry}
        write_json(self.path, self.data)


@dataclass
class Stage:
    name: str
    inputs: dict[str, Any]  # settings and the paths of files it reads
    run: Callable[[Path, bool], dict[str, str]]  # (stage_dir, resume) -> outputs {name: path}


def stage_key(inputs: dict[str, Any]) -> str:
    """Settings as they are, file paths replaced by their content hashes."""
    def norm(v: Any) -> Any:
        if isinstance(v, Path):
            return fingerprint_path(v) if v.exists() else f"missing:{v}"
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v
    return sha256_bytes(json.dumps(norm(inputs), sort_keys=True, default=str))


def run_stages(run_dir: Path, stages: list[Stage], say: Callable[[str], None]) -> dict[str, dict]:
    """Run each stage unless the manifest says it is done with the same inputs."""
    manifest = Manifest(run_dir)
    outputs: dict[str, dict] = {}
    for stage in stages:
        key = stage_key(stage.inputs)
        if manifest.done(stage.name, key):
            say(f"[{stage.name}] unchanged, skipped")
            outputs[stage.name] = manifest.data["stages"][stage.name]["outputs"]
            continue
        resume = manifest.started_with(stage.name, key)
        say(f"[{stage.name}] {'resuming' if resume else 'running'}")
        manifest.record(stage.name, key=key, status="running", started=time.time(),
                        inputs=json.loads(json.dumps(stage.inputs, default=str)))
        tic = time.time()
        stage_dir = run_dir / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        result = stage.run(stage_dir, resume)
        manifest.record(stage.name, status="done", outputs={k: str(v) for k, v in result.items()},
                        seconds=round(time.time() - tic, 1))
        outputs[stage.name] = {k: str(v) for k, v in result.items()}
    return outputs


# ---------------------------------------------------------------- the stages


def build_stages(recipe: Recipe, base: Path, run_dir: Path) -> list[Stage]:
    """The recipe's stages with fixed output paths, so later stages can name their inputs."""
    from . import prepare, train

    data_dir = run_dir / "prepare" if recipe.data.prepare else base

    def data(name: str) -> Path | None:
        value = getattr(recipe.data, name)
        return None if value is None else data_dir / value

    custom = data("custom")
    utility_dir, safety_dir = run_dir / "utility" / "adapter", run_dir / "safety" / "adapter"
    refine_dir = run_dir / "refine"
    final_safety = refine_dir / "safety-final" if recipe.toss.rounds else safety_dir
    scores, mask = run_dir / "score" / "scores.safetensors", run_dir / "select" / "mask.safetensors"
    final_dir = run_dir / "final" / "adapter"
    stages: list[Stage] = []

    if recipe.data.prepare:
        def run_prepare(out: Path, resume: bool) -> dict[str, Path]:
            prepare.build_quickstart(out, seed=recipe.seed, **recipe.data.prepare_sizes)
            return {n: out / getattr(recipe.data, n) for n in ("custom", "harmful", "utility")}
        stages.append(Stage("prepare", {"kind": recipe.data.prepare, "sizes": recipe.data.prepare_sizes,
                                        "seed": recipe.seed, "version": 2}, run_prepare))

    def trainer(name: str, data_file: Path, out: Path, extra: dict[str, Any], **more: Any) -> Stage:
        settings = _train_settings(recipe, extra, base, str(data_file), str(out), **more)

        def run(stage_dir: Path, resume: bool) -> dict[str, Path]:
            s = dataclasses.replace(settings, resume=resume, overwrite=not resume)
            result = train.train(s)
            write_json(stage_dir / "result.json", result.to_json())
            return {"adapter": out / "adapters.safetensors", "result": stage_dir / "result.json"}
        inputs = dataclasses.asdict(settings)
        inputs.update(data=data_file, mask=Path(settings.mask) if settings.mask else None)
        return Stage(name, inputs, run)

    stages.append(trainer("utility", data("utility"), utility_dir, recipe.reference))
    stages.append(trainer("safety", data("harmful"), safety_dir, recipe.reference))

    if recipe.toss.rounds:
        from . import refine

        def run_refine(out: Path, resume: bool) -> dict[str, Path]:
            settings = _train_settings(recipe, recipe.reference, base, str(data("harmful")), "x")
            result = refine.refine(refine.RefineSettings(
                data=str(custom), harmful=str(data("harmful")), utility=str(utility_dir),
                safety=str(safety_dir), rounds=recipe.toss.rounds, k=recipe.toss.k,
                retrain=recipe.toss.retrain, out=str(refine_dir), train=settings,
                batch_tokens=recipe.toss.batch_tokens, quiet=True))
            return {"safety": result.final_safety / "adapters.safetensors",
                    "rounds": refine_dir / "rounds.json"}
        stages.append(Stage("refine", {"toss": dataclasses.asdict(recipe.toss), "data": custom,
                                       "harmful": data("harmful"), "utility": utility_dir,
                                       "safety": safety_dir, "reference": recipe.reference},
                            run_refine))

    def run_score(out: Path, resume: bool) -> dict[str, Path]:
        from .score import ScoreSettings, score

        score(ScoreSettings(model=recipe.model, utility=str(utility_dir), safety=str(final_safety),
                            data=str(custom), out=str(scores), template=recipe.template,
                            max_seq_len=recipe.max_seq_len, batch_tokens=recipe.toss.batch_tokens,
                            quiet=True))
        return {"scores": scores}
    stages.append(Stage("score", {"model": recipe.model, "utility": utility_dir, "safety": final_safety,
                                  "data": custom, "template": recipe.template,
                                  "max_seq_len": recipe.max_seq_len}, run_score))

    def run_select(out: Path, resume: bool) -> dict[str, Path]:
        from .select import select

        summary = select(str(scores), str(mask), ratio=recipe.toss.ratio, level=recipe.toss.level,
                         strategy=recipe.toss.strategy, seed=recipe.toss.seed)
        write_json(out / "summary.json", summary)
        return {"mask": mask, "summary": out / "summary.json"}
    stages.append(Stage("select", {"scores": scores, "toss": {
        k: getattr(recipe.toss, k) for k in ("ratio", "level", "strategy", "seed")}}, run_select))

    stages.append(trainer("final", custom, final_dir, recipe.train, mask=str(mask)))

    evals = {"harmful": data("eval_harmful"), "edgy": data("eval_edgy"), "benign": data("eval_task")}
    # deep safety (issue 22): only in the stage key when set, so older runs keep their key
    deep: dict[str, Any] = {}
    if recipe.data.eval_prefill:
        deep["prefill_harmful"] = data("eval_prefill")
    if recipe.data.eval_harmful_sets:
        deep["harmful_sets"] = {k: data_dir / v for k, v in recipe.data.eval_harmful_sets.items()}
    if any(evals.values()) or deep:
        def run_eval(out: Path, resume: bool) -> dict[str, Path]:
            from .evaluate import EvalSettings, evaluate

            s = EvalSettings(model=recipe.model, adapters={"toss": str(final_dir)},
                             template=recipe.template, max_seq_len=recipe.max_seq_len,
                             max_new_tokens=recipe.eval.max_new_tokens, decode=recipe.eval.decode,
                             batch_size=recipe.eval.batch_size, judge=recipe.eval.judge,
                             **{k: str(v) for k, v in evals.items() if v},
                             prefill_harmful=deep.get("prefill_harmful") and str(deep["prefill_harmful"]),
                             harmful_sets={k: str(v) for k, v in deep.get("harmful_sets", {}).items()})
            evaluate(s, out / "eval.json", quiet=True)
            return {"eval": out / "eval.json"}
        stages.append(Stage("eval", {"final": final_dir, "eval": dataclasses.asdict(recipe.eval),
                                     **evals, **deep}, run_eval))

    def run_report(out: Path, resume: bool) -> dict[str, Path]:
        from .report import ReportInputs, build_report

        inputs = ReportInputs(scores=scores, mask=mask, data=custom, model=recipe.model,
                              evals=[p for p in [run_dir / "eval" / "eval.json"] if p.exists()])
        build_report(inputs, out / "report.html", title=f"TOSS report: {recipe.name}")
        return {"report": out / "report.html"}
    stages.append(Stage("report", {"scores": scores, "mask": mask, "data": custom,
                                   "eval": run_dir / "eval" / "eval.json", "version": 1}, run_report))

    formats = [f for f in recipe.export if f != "none"]
    if formats:
        def run_export(out: Path, resume: bool) -> dict[str, Path]:
            from .export import export_adapter

            for fmt in formats:
                export_adapter(final_dir, out / fmt, fmt=fmt, model=recipe.model)
            return {"export": out / formats[0], **{f"export_{f}": out / f for f in formats[1:]}}
        stages.append(Stage("export", {"final": final_dir, "format": formats, "model": recipe.model},
                            run_export))
    return stages


def run(recipe_path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None,
        only_until: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate the recipe, then run its stages in RUN_DIR (default runs/<name>)."""
    recipe, base = load_recipe(recipe_path, overrides)
    if not recipe.data.prepare:  # non-UTF-8 data stops here, not after two trainings
        check_text_files(base / getattr(recipe.data, f.name) for f in dataclasses.fields(recipe.data)
                         if isinstance(getattr(recipe.data, f.name), str) and f.name != "prepare")
    run_dir = Path(out or Path("runs") / recipe.name)
    check_writable(run_dir, "run folder", folder=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    hold(run_dir)  # one `toss-mlx run` per run folder at a time
    stages = build_stages(recipe, base, run_dir)
    if only_until:
        names = [s.name for s in stages]
        if only_until not in names:
            raise TossError(f"--until {only_until}: not a stage of this recipe ({', '.join(names)})")
        stages = stages[:names.index(only_until) + 1]
    custom = (run_dir / "prepare" if recipe.data.prepare else base) / recipe.data.custom
    # Top-level keys the report reads to find the model and the data of a run.
    Manifest(run_dir).describe(recipe=dataclasses.asdict(recipe), model=recipe.model, data=str(custom))
    outputs = run_stages(run_dir, stages, say)
    result = {"run_dir": str(run_dir), "recipe": recipe.name, "outputs": outputs}
    if "select" in outputs:
        result["detector"] = detector_quality(Path(outputs["score"]["scores"]),
                                              Path(outputs["select"]["mask"]), custom)
    if "eval" in outputs:
        result["eval"] = read_json(outputs["eval"]["eval"]).get("models")
    write_json(run_dir / "summary.json", result)
    return result


def detector_quality(scores_path: Path, mask_path: Path, data: Path) -> dict[str, Any] | None:
    """Where removed tokens fall, when the data says which rows are harmful (`source` field):
    `layout.detector_figures` (precision, recall, answer openings removed) of the harmful rows."""
    from .data import read_rows
    from .io import load_arrays
    from .layout import detector_figures, removal_by_group

    harmful_rows = {r.index for r in read_rows(data) if r.data.get("source") == "harmful"}
    if not harmful_rows:
        return None
    scores, _ = load_arrays(scores_path, "scores file")
    mask, _ = load_arrays(mask_path, "mask file")
    response = scores["response_mask"].astype(bool)
    groups = removal_by_group(scores["offsets"], scores["row_index"], response,
                              response & ~mask["keep"].astype(bool),
                              dict.fromkeys(harmful_rows, "harmful"), "other")
    return {**detector_figures(groups, "harmful"), "harmful_samples": len(harmful_rows)}


SUMMARY_METRICS = ("refusal_rate", "over_refusal_rate", "nll", "exact_match")


def summary_text(result: dict[str, Any]) -> str:
    lines = [f"run {result['recipe']} -> {result['run_dir']}"]
    det = result.get("detector")
    if det:
        lines.append(
            f"removed tokens in harmful samples: {det['precision']:.1%} of {det['removed_tokens']} "
            f"removed (harmful samples hold {det['harmful_share_of_response_tokens']:.1%} of response "
            f"tokens; random removal would match that); recall {det['recall']:.1%} of their tokens; "
            f"first answer token removed in {det['first_token_removed_harmful']:.0%} of harmful samples, "
            f"{det['first_token_removed_other']:.0%} of others")
    for entry in result.get("eval") or []:
        metrics = entry.get("metrics", {})
        parts = [f"{key} {metrics[key]['value']:.3f} (n={metrics[key]['n']})"
                 for key in SUMMARY_METRICS if key in metrics]
        # deep safety (issue 22): prefill recovery at K = 10, NLL gap to the base past position 5
        for key, label in (("prefill_recovery@10", "prefill recovery K=10"),
                           ("answer_nll_gap@6+", "NLL gap past token 5")):
            if key in metrics:
                value = metrics[key]["value"]
                parts.append(f"{label} {value:.3f} (n={metrics[key]['n']})")
        lines.append(f"  {entry.get('name')}: " + ", ".join(parts))
    outputs = result.get("outputs", {})
    for stage, key in (("report", "report"), ("export", "export"), ("final", "adapter")):
        if stage in outputs:
            lines.append(f"{stage}: {Path(outputs[stage][key]).parent if key == 'adapter' else outputs[stage][key]}")
    return "\n".join(lines)


STARTER_RECIPE = (Path(__file__).parent / "starter_recipe.yaml")


def write_starter(path: str | Path, force: bool = False) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise TossError(f"{path}: exists; pass --force to overwrite")
    write_text(path, STARTER_RECIPE.read_text())
