"""The whole method from one recipe: `toss-mlx run RECIPE.yaml`.

Stages, in order (each writes into RUN_DIR/<stage>/, named by `RunLayout`):
  prepare   build the data files from packaged data sets (when `data.prepare` is set)
  base      fuse `base_adapter` into `model` (when set): every later stage starts from
            the fused model, e.g. an aligned base made from a model without safety training
  utility   train the utility-oriented reference adapter on `data.utility`
  safety    train the safety-degraded reference adapter on `data.harmful`
  refine    TOSS-Pro rounds (when `toss.rounds > 0`): grow the harmful set, retrain safety
  score     score every response token of `data.custom` with both references (after
            TOSS-Pro: take the final scores refine computed, no second scoring)
  select    keep_mask: drop the top `toss.ratio` share of tokens
  final     train the final adapter on the kept tokens
  standard_sft  the same fine-tune on every response token (when `baselines` names it),
            evaluated beside TOSS: what the selection buys on the same data
  eval      safety and utility of the base and the final adapter (when eval data is given)
  report    report.html: token heatmap, score histogram, position plot, metrics
  export    the final adapter in `export` (PEFT by default)

Each stage is a function (recipe, layout, upstream) -> StagePlan: the settings object
it runs and a `run(resume)` that returns its outputs. `upstream` holds what earlier
stages returned, so a stage reads the files the stage before it wrote, never a path
it guesses. A stage's key is `cache.cache_key` of its settings object, with every
input file or adapter it names hashed by content (see `stage_key`).

RUN_DIR/manifest.json records each stage's key, settings and outputs. Running again
skips a stage whose key is unchanged and whose outputs exist, so changing
`toss.ratio` reruns only select, final, eval, report and export. A stage killed
midway is started again with resume on: the trainer, the scorer and TOSS-Pro's rounds
pick up where they stopped. The base model is named, not hashed: a model folder
edited in place is not noticed.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_type_hints

from .cache import cache_key
from .checks import check_writable, hold
from .config import build_config, merge, parse_overrides, problems_of, read_yaml
from .data import check_text_files
from .io import TossError, atomic_path, read_json, write_json, write_text
from .models.lora import LoraSettings
from .train import TrainSettings

STAGES = ("prepare", "base", "utility", "safety", "refine", "score", "select", "final",
          "standard_sft", "eval", "report", "export")
DATA_FILES = ("custom", "harmful", "utility", "valid", "eval_harmful", "eval_edgy", "eval_task",
              "eval_prefill")


# ---------------------------------------------------------------- the recipe


@dataclass
class DataFiles:
    # Build the files below from packaged data sets: `prepare.build_quickstart`, or
    # `prepare.build_reproduce` (the reproduction's splits: nothing evaluated shares a prompt
    # with HarmBench, the set `bench/aligned_adapter.py` aligns on).
    prepare: Literal["quickstart", "reproduce"] | None = None
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

    def __post_init__(self) -> None:
        from .select import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r} (expected one of "
                             f"{', '.join(STRATEGIES)})")
        if self.strategy in ("first-k", "sample-filter") and self.level != "global":
            raise ValueError(f"strategy {self.strategy} has no per-sample level; leave level at global")
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):  # NaN fails too
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be 0 or more, got {self.rounds}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {self.batch_tokens}")


@dataclass
class EvalOptions:
    max_new_tokens: int = 128
    # eval_task's answers (worked solutions): None: max_new_tokens; 0: the reference NLL only
    benign_max_new_tokens: int | None = None
    decode: Literal["greedy", "sample"] = "greedy"
    batch_size: int = 8
    judge: str | None = None
    prefill_tokens: list[int] = field(default_factory=lambda: [5, 10, 20])  # the prefilling attack's K

    def __post_init__(self) -> None:
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.benign_max_new_tokens is not None and self.benign_max_new_tokens < 0:
            raise ValueError(f"benign_max_new_tokens must be 0 (the likelihood only) or more, got "
                             f"{self.benign_max_new_tokens}")
        if not self.prefill_tokens or any(k < 1 for k in self.prefill_tokens):
            raise ValueError(f"prefill_tokens {self.prefill_tokens}: need token counts >= 1, e.g. [5, 10, 20]")


# TrainSettings fields a recipe cannot set in `train:` / `reference:`: the stage's files
# and output folder come from the run layout, the model, template, length, seed and LoRA
# from the recipe's top level (so both references and the final model share them).
PIPELINE_SET = {"model": "the recipe's top-level `model`", "data": "the stage (data.*)",
                "out": "the run layout", "mask": "the select stage", "valid": "data.valid",
                "init_adapter": "the stage", "resume": "the manifest", "overwrite": "the manifest",
                "quiet": "the pipeline", "lora": "the recipe's top-level `lora`",
                "template": "the recipe's top-level `template`",
                "max_seq_len": "the recipe's top-level `max_seq_len`",
                "seed": "the recipe's top-level `seed`",
                "dtype": "the recipe's top-level `dtype`",
                "keep_quantized": "the recipe's top-level `keep_quantized`"}


def _train_options_class() -> type:
    """TrainOptions: every `toss-mlx train` setting a recipe may set, each optional (None: the
    default). Built from TrainSettings' own fields, so the two never drift apart."""
    hints = get_type_hints(TrainSettings)
    fields = [(f.name, Optional[hints[f.name]], dataclasses.field(default=None))  # noqa: UP045
              for f in dataclasses.fields(TrainSettings) if f.name not in PIPELINE_SET]
    cls = dataclasses.make_dataclass("TrainOptions", fields)
    cls.__module__, cls.__doc__ = __name__, _train_options_class.__doc__
    return cls


TrainOptions = _train_options_class()


def options_dict(options: Any) -> dict[str, Any]:
    """The settings a TrainOptions sets (its non-None fields)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) is not None}


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Recipe:
    model: str = ""  # required: a registry name, a model folder or a hub id
    name: str = "toss-run"  # the run folder runs/<name> (a plain name, no path)
    template: Literal["chat", "plain"] = "chat"
    max_seq_len: int = 2048
    seed: int = 42
    # How every stage loads the model (`toss-mlx train --dtype/--keep-quantized`); None: the device's.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    keep_quantized: bool = False
    # An mlx-lm adapter folder (relative to the recipe) fused into `model` before any stage,
    # e.g. recipes/adapters/smollm2-135m-aligned: a safety-aligned base for a model without
    # safety training. The references, the fine-tunes, eval ("base") and export use the fused model.
    base_adapter: str | None = None
    # Fine-tunes run beside TOSS on the same data, budget and settings, and evaluated with it:
    # standard_sft (every response token in the loss).
    baselines: list[Literal["standard_sft"]] = field(default_factory=list)
    data: DataFiles = field(default_factory=DataFiles)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainOptions = field(default_factory=TrainOptions)  # the final fine-tune
    reference: TrainOptions = field(default_factory=TrainOptions)  # over `train`, for the references
    toss: TossSettings = field(default_factory=TossSettings)
    eval: EvalOptions = field(default_factory=EvalOptions)
    # One format or a list (`export: [peft, gguf]`); the GGUF ones are written from `model`.
    export: list[Literal["peft", "mlx", "gguf", "gguf-lora", "ollama", "none"]] = field(
        default_factory=lambda: ["peft"])

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: required (a registry name such as smollm2-135m-instruct, "
                             "a model folder or a hub id); there is no default model")
        if not _NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(f"name: {self.name!r} must be a plain folder name (letters, digits, "
                             "'.', '_', '-'; no '/', no '..'): the run folder is runs/<name>")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")

    def reference_options(self) -> dict[str, Any]:
        """The references' train settings: `train`, overridden by `reference`."""
        return {**options_dict(self.train), **options_dict(self.reference)}


def _custom_rows(recipe: Recipe, base: Path) -> int | None:
    """How many rows the custom data has, when that is known before any compute."""
    if recipe.data.prepare:
        builder = prepare_builder(recipe.data.prepare)
        params = inspect.signature(builder).parameters
        names = [k for k in ("n_task", "n_task_custom", "n_harmful_custom") if k in params]
        sizes = {k: params[k].default for k in names}
        sizes.update({k: v for k, v in recipe.data.prepare_sizes.items() if k in sizes})
        return sum(int(v) for v in sizes.values())
    path = base / recipe.data.custom
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def _plan_problems(recipe: Recipe, base: Path) -> list[str]:
    """What would fail later, found now: every stage's settings are built (and checked)."""
    problems: list[str] = []
    layout = RunLayout(Path("runs") / recipe.name, base)
    files = {name: Path(f"{name}.jsonl") for name in DATA_FILES}
    # The two references share their settings; the final model has its own.
    for section, stage, options in (("reference", "utility", recipe.reference_options()),
                                    ("train", "final", options_dict(recipe.train))):
        try:
            _train_settings(recipe, options, files["custom"], layout.adapter(stage))
        except TossError as e:
            problems += [f"{section}: {line.removeprefix('TrainSettings: ')}"
                         for line in problems_of(e, "recipe")]
    if recipe.data.prepare:
        params = inspect.signature(prepare_builder(recipe.data.prepare)).parameters
        problems += [f"data.prepare_sizes.{k}: not a size of prepare {recipe.data.prepare} "
                     f"(expected one of {', '.join(p for p in params if p.startswith('n_'))})"
                     for k in recipe.data.prepare_sizes if k not in params or not k.startswith("n_")]
    if recipe.base_adapter is not None:
        from .cache import is_adapter_folder

        folder = base / recipe.base_adapter
        if not is_adapter_folder(folder):
            problems.append(f"base_adapter: {folder} is not an adapter folder (adapter_config.json "
                            "and adapters.safetensors)")
    if recipe.toss.rounds:
        n = _custom_rows(recipe, base)
        if n is not None and recipe.toss.k * recipe.toss.rounds > n:
            problems.append(f"toss: k={recipe.toss.k} x rounds={recipe.toss.rounds} is more than "
                            f"the {n} samples of data.custom")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read and validate a recipe; every problem is reported at once, before any compute."""
    path = Path(path)
    if path.is_dir():
        raise TossError(f"{path}: is a folder; give a recipe YAML file (see `toss-mlx init`)")
    raw = merge(read_yaml(path), parse_overrides(overrides or []))
    problems: list[str] = []
    for section in ("train", "reference"):
        options = raw.get(section)
        if isinstance(options, dict):
            for key in list(options):
                name = str(key).replace("-", "_")
                if name in PIPELINE_SET:
                    problems.append(f"{section}.{key}: not settable in a recipe (set by "
                                    f"{PIPELINE_SET[name]})")
                    del options[key]
    recipe = None
    try:
        recipe = build_config(Recipe, raw, source=str(path))
    except TossError as e:
        problems += [line.removeprefix("Recipe: ") for line in problems_of(e, str(path))]
    base = path.parent
    files = {**{f.name: f.default for f in dataclasses.fields(DataFiles)}, **(raw.get("data") or {})}
    if not files.get("prepare"):
        for name, value in files.items():
            if name.startswith("prepare") or not isinstance(value, str):
                continue
            if not (base / value).exists():
                problems.append(f"data.{name}: {base / value} not found")
    if recipe is not None:
        problems += _plan_problems(recipe, base)
    if len(problems) == 1:
        raise TossError(f"{path}: invalid recipe: {problems[0]}")
    if problems:
        raise TossError(f"{path}: invalid recipe:\n  " + "\n  ".join(problems))
    return recipe, base


# ---------------------------------------------------------------- the run folder


@dataclass(frozen=True)
class RunLayout:
    """The one place that names a run's paths: RUN_DIR/<stage>/..., and the recipe's folder."""

    run_dir: Path
    recipe_dir: Path  # data paths of a recipe are relative to it

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def adapter(self, stage: str) -> Path:
        """utility, safety, final: the stage's adapter folder."""
        return self.stage_dir(stage) / "adapter"

    def result(self, stage: str) -> Path:
        return self.stage_dir(stage) / "result.json"

    @property
    def prepared(self) -> Path:
        return self.stage_dir("prepare")

    @property
    def refine_dir(self) -> Path:
        return self.stage_dir("refine")

    @property
    def scores(self) -> Path:
        return self.stage_dir("score") / "scores.safetensors"

    @property
    def mask(self) -> Path:
        return self.stage_dir("select") / "mask.safetensors"

    @property
    def selection(self) -> Path:
        return self.stage_dir("select") / "summary.json"

    @property
    def eval(self) -> Path:
        return self.stage_dir("eval") / "eval.json"

    @property
    def report(self) -> Path:
        return self.stage_dir("report") / "report.html"

    def export(self, export_format: str) -> Path:
        return self.stage_dir("export") / export_format


def run_dir_of(recipe: Recipe, out: str | Path | None) -> Path:
    """--out as given, else runs/<name> (the name is a plain folder name, checked in Recipe)."""
    return Path(out) if out is not None else Path("runs") / recipe.name


# ---------------------------------------------------------------- the manifest


# Settings fields that name a file or folder the stage reads: the key hashes their content.
INPUT_FIELDS = frozenset({"data", "mask", "valid", "init_adapter", "utility", "safety", "harmful",
                          "benign", "edgy", "adapters", "scores", "adapter", "prefill_harmful",
                          "harmful_sets"})


def _with_input_paths(settings: Any) -> Any:
    """The settings as a dict, with each input field's value as a Path (content-hashed)."""
    def as_path(value: Any) -> Any:
        if isinstance(value, (str, Path)) and value:
            return Path(value)
        if isinstance(value, dict):
            return {k: as_path(v) for k, v in value.items()}
        if isinstance(value, list):
            return [as_path(v) for v in value]
        return value

    if not dataclasses.is_dataclass(settings):
        return settings
    view = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        view[f.name] = as_path(value) if f.name in INPUT_FIELDS else _with_input_paths(value)
    return {"type": type(settings).__name__, "fields": view}


def stage_key(settings: Any) -> str:
    """cache_key of the settings object a stage runs, with its input files hashed by content."""
    return cache_key(_with_input_paths(settings))


def _settings_record(settings: Any) -> Any:
    """The settings as JSON for the manifest (paths as strings)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


class Manifest:
    """RUN_DIR/manifest.json: each stage's key (see `stage_key`), settings and outputs."""

    def __init__(self, path: Path):
        self.path = path
        self.doc = read_json(path) if path.exists() else {"stages": {}}

    def done(self, stage: str, key: str) -> bool:
        entry = self.doc["stages"].get(stage)
        return bool(entry and entry.get("key") == key and entry.get("status") == "done"
                    and all(Path(p).exists() for p in entry.get("outputs", {}).values()))

    def started_with(self, stage: str, key: str) -> bool:
        entry = self.doc["stages"].get(stage)
        return bool(entry and entry.get("key") == key)

    def outputs(self, stage: str) -> dict[str, Path]:
        return {k: Path(v) for k, v in self.doc["stages"][stage]["outputs"].items()}

    def describe(self, **info: Any) -> None:
        self.doc.update(info)
        write_json(self.path, self.doc)

    def record(self, stage: str, **entry: Any) -> None:
        self.doc["stages"][stage] = {**self.doc["stages"].get(stage, {}), **entry}
        write_json(self.path, self.doc)


# ---------------------------------------------------------------- the stages


Upstream = dict[str, dict[str, Path]]  # stage -> the outputs it returned {name: path}
Say = Callable[[str], None]


@dataclass
class StagePlan:
    settings: Any  # the settings object the stage runs; `stage_key(settings)` is its key
    run: Callable[[bool, Say], dict[str, Path]]  # (resume, say) -> outputs {name: path}


@dataclass
class PrepareSettings:
    kind: str
    sizes: dict[str, int]
    seed: int
    out: str


def prepare_builder(kind: str) -> Callable[..., dict[str, Any]]:
    """The `prepare` module's builder of a `data.prepare` kind."""
    from . import prepare

    return {"quickstart": prepare.build_quickstart, "reproduce": prepare.build_reproduce}[kind]


@dataclass
class BaseModelSettings:
    model: str
    adapter: str  # an input field: the key hashes the adapter's config and weights


@dataclass
class RefinedScores:
    """The score stage after TOSS-Pro: refine's final scores, taken as they are."""

    scores: str
    out: str


@dataclass
class SelectStageSettings:
    scores: str
    out: str
    ratio: float
    level: str
    strategy: str
    seed: int


@dataclass
class ReportStageSettings:
    scores: str
    mask: str
    data: str
    evals: list[str]
    model: str
    title: str
    out: str


@dataclass
class ExportStageSettings:
    adapter: str
    export_formats: list[str]
    model: str  # the GGUF formats fuse the adapter into it
    out: str


def data_files(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> dict[str, Path | None]:
    """The recipe's data files: written by the prepare stage, or next to the recipe."""
    if recipe.data.prepare:
        made = upstream["prepare"]
        return {name: made.get(name) for name in DATA_FILES}
    return {name: None if getattr(recipe.data, name) is None
            else layout.recipe_dir / getattr(recipe.data, name) for name in DATA_FILES}


def harmful_sets(recipe: Recipe, layout: RunLayout) -> dict[str, Path]:
    """The recipe's extra harmful prompt sets (name -> file), each reported apart by eval."""
    folder = layout.prepared if recipe.data.prepare else layout.recipe_dir
    return {name: folder / file for name, file in recipe.data.eval_harmful_sets.items()}


def base_model(recipe: Recipe, upstream: Upstream) -> str:
    """The model every stage starts from: the base stage's fused model, else the recipe's."""
    return str(upstream["base"]["model"]) if "base" in upstream else recipe.model


def _train_settings(recipe: Recipe, options: dict[str, Any], data_file: Path, out: Path,
                    model: str | None = None, **files: Path | None) -> TrainSettings:
    """A stage's TrainSettings: the recipe's shared settings, the stage's options, its files."""
    shared = {"model": model or recipe.model, "template": recipe.template, "max_seq_len": recipe.max_seq_len,
              "seed": recipe.seed, "lora": dataclasses.asdict(recipe.lora), "dtype": recipe.dtype,
              "keep_quantized": recipe.keep_quantized}
    stage = {"data": str(data_file), "out": str(out), "quiet": True,
             **{k: str(v) for k, v in files.items() if v is not None}}
    return build_config(TrainSettings, shared, options, stage, source="recipe")


def _trainer(stage: str, settings: TrainSettings, layout: RunLayout) -> StagePlan:
    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .train import train

        result = train(dataclasses.replace(settings, resume=resume, overwrite=not resume))
        write_json(layout.result(stage), result.to_json())
        return {"adapter": Path(settings.out), "result": layout.result(stage)}
    return StagePlan(settings, run)


def prepare_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    settings = PrepareSettings(str(recipe.data.prepare), dict(recipe.data.prepare_sizes),
                               recipe.seed, str(layout.prepared))

    def run(resume: bool, say: Say) -> dict[str, Path]:
        prepare_builder(settings.kind)(settings.out, seed=settings.seed, **settings.sizes)
        names = {name: getattr(recipe.data, name) for name in DATA_FILES}
        return {name: Path(settings.out) / value for name, value in names.items()
                if value is not None and (Path(settings.out) / value).exists()}
    return StagePlan(settings, run)


def utility_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    files = data_files(recipe, layout, upstream)
    return _trainer("utility", _train_settings(recipe, recipe.reference_options(), files["utility"],
                                               layout.adapter("utility"),
                                               model=base_model(recipe, upstream)), layout)


def safety_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    files = data_files(recipe, layout, upstream)
    return _trainer("safety", _train_settings(recipe, recipe.reference_options(), files["harmful"],
                                              layout.adapter("safety"),
                                              model=base_model(recipe, upstream)), layout)


def refine_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    from .refine import RefineSettings, refine

    files = data_files(recipe, layout, upstream)
    safety_train = _train_settings(recipe, recipe.reference_options(), files["harmful"],
                                   layout.refine_dir, model=base_model(recipe, upstream))  # data and out are set per round by refine
    settings = RefineSettings(
        data=str(files["custom"]), harmful=str(files["harmful"]),
        utility=str(upstream["utility"]["adapter"]), safety=str(upstream["safety"]["adapter"]),
        out=str(layout.refine_dir), train=safety_train, rounds=recipe.toss.rounds, k=recipe.toss.k,
        retrain=recipe.toss.retrain, ratio=recipe.toss.ratio, batch_tokens=recipe.toss.batch_tokens,
        quiet=True)

    def run(resume: bool, say: Say) -> dict[str, Path]:
        result = refine(dataclasses.replace(settings, resume=resume), say=say)
        return {"safety": result.final_safety, "scores": result.final_scores,
                "rounds": result.summary}
    return StagePlan(settings, run)


def score_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    if "refine" in upstream:  # TOSS-Pro scored the data with its final safety model already
        refined = RefinedScores(scores=str(upstream["refine"]["scores"]), out=str(layout.scores))

        def adopt(resume: bool, say: Say) -> dict[str, Path]:
            # A copy, so RUN_DIR/score/ holds the run's scores whichever way they were made.
            with atomic_path(refined.out) as tmp:
                shutil.copyfile(refined.scores, tmp)
            return {"scores": Path(refined.out)}
        return StagePlan(refined, adopt)

    from .score import ScoreSettings

    files = data_files(recipe, layout, upstream)
    train = options_dict(recipe.train)
    settings = ScoreSettings(model=base_model(recipe, upstream), utility=str(upstream["utility"]["adapter"]),
                             safety=str(upstream["safety"]["adapter"]), data=str(files["custom"]),
                             out=str(layout.scores), template=recipe.template,
                             max_seq_len=recipe.max_seq_len, batch_tokens=recipe.toss.batch_tokens,
                             fmt=train.get("format", "auto"),
                             skip_bad_rows=train.get("skip_bad_rows", False), quiet=True,
                             dtype=recipe.dtype, keep_quantized=recipe.keep_quantized)

    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .score import score

        score(settings)
        return {"scores": Path(settings.out)}
    return StagePlan(settings, run)


def select_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    settings = SelectStageSettings(scores=str(upstream["score"]["scores"]), out=str(layout.mask),
                                   ratio=recipe.toss.ratio, level=recipe.toss.level,
                                   strategy=recipe.toss.strategy, seed=recipe.toss.seed)

    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .select import select

        summary = select(settings.scores, settings.out, ratio=settings.ratio, level=settings.level,
                         strategy=settings.strategy, seed=settings.seed)
        write_json(layout.selection, summary)
        return {"mask": Path(settings.out), "summary": layout.selection}
    return StagePlan(settings, run)


def final_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    files = data_files(recipe, layout, upstream)
    settings = _train_settings(recipe, options_dict(recipe.train), files["custom"],
                               layout.adapter("final"), model=base_model(recipe, upstream),
                               mask=upstream["select"]["mask"], valid=files["valid"])
    return _trainer("final", settings, layout)


def standard_sft_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    """The final fine-tune's settings without the mask: every response token in the loss."""
    files = data_files(recipe, layout, upstream)
    settings = _train_settings(recipe, options_dict(recipe.train), files["custom"],
                               layout.adapter("standard_sft"), model=base_model(recipe, upstream),
                               valid=files["valid"])
    return _trainer("standard_sft", settings, layout)


def base_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    """Fuse `base_adapter` into `model`. The folder is named by the stage's key, so every later
    stage's key (which names the model by path) changes when the adapter or the model does."""
    settings = BaseModelSettings(model=recipe.model,
                                 adapter=str(layout.recipe_dir / str(recipe.base_adapter)))
    out = layout.stage_dir("base") / f"model-{stage_key(settings)[:12]}"

    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .fuse import fuse_adapter

        for old in layout.stage_dir("base").glob("model-*"):  # an earlier adapter's fused model
            if old != out and old.is_dir():
                shutil.rmtree(old)
        fuse_adapter(settings.model, settings.adapter, out, dequantize=True)
        return {"model": out}
    return StagePlan(settings, run)


def eval_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    from .evaluate import EvalSettings

    files = data_files(recipe, layout, upstream)
    prompts = {"harmful": files["eval_harmful"], "edgy": files["eval_edgy"],
               "benign": files["eval_task"]}
    adapters = {name: str(upstream[name]["adapter"]) for name in recipe.baselines}
    adapters["toss"] = str(upstream["final"]["adapter"])
    settings = EvalSettings(model=base_model(recipe, upstream), adapters=adapters,
                            template=recipe.template, max_seq_len=recipe.max_seq_len,
                            max_new_tokens=recipe.eval.max_new_tokens, decode=recipe.eval.decode,
                            benign_max_new_tokens=recipe.eval.benign_max_new_tokens,
                            prefill_tokens=list(recipe.eval.prefill_tokens),
                            batch_size=recipe.eval.batch_size, judge=recipe.eval.judge,
                            **{k: str(v) for k, v in prompts.items() if v},
                            prefill_harmful=files["eval_prefill"] and str(files["eval_prefill"]),
                            harmful_sets={k: str(v) for k, v in harmful_sets(recipe, layout).items()},
                            dtype=recipe.dtype, keep_quantized=recipe.keep_quantized)

    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .evaluate import evaluate

        evaluate(settings, layout.eval, quiet=True)
        return {"eval": layout.eval}
    return StagePlan(settings, run)


def report_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    files = data_files(recipe, layout, upstream)
    settings = ReportStageSettings(
        scores=str(upstream["score"]["scores"]), mask=str(upstream["select"]["mask"]),
        data=str(files["custom"]), evals=[str(upstream["eval"]["eval"])] if "eval" in upstream else [],
        model=base_model(recipe, upstream), title=f"TOSS report: {recipe.name}", out=str(layout.report))

    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .report import ReportInputs, build_report

        inputs = ReportInputs(scores=Path(settings.scores), mask=Path(settings.mask),
                              data=Path(settings.data), evals=[Path(p) for p in settings.evals],
                              model=settings.model)
        build_report(inputs, settings.out, title=settings.title)
        return {"report": Path(settings.out)}
    return StagePlan(settings, run)


def export_stage(recipe: Recipe, layout: RunLayout, upstream: Upstream) -> StagePlan:
    formats = [f for f in recipe.export if f != "none"]
    settings = ExportStageSettings(adapter=str(upstream["final"]["adapter"]), export_formats=formats,
                                   model=base_model(recipe, upstream),
                                   out=str(layout.stage_dir("export")))

    def run(resume: bool, say: Say) -> dict[str, Path]:
        from .export import export_adapter

        for export_format in settings.export_formats:
            export_adapter(settings.adapter, layout.export(export_format), fmt=export_format,
                           model=settings.model)
        first, *rest = settings.export_formats
        return {"export": layout.export(first), **{f"export_{f}": layout.export(f) for f in rest}}
    return StagePlan(settings, run)


StageFn = Callable[[Recipe, RunLayout, Upstream], StagePlan]


def stages_of(recipe: Recipe) -> list[tuple[str, StageFn]]:
    """The recipe's stages, in order."""
    stages: list[tuple[str, StageFn]] = []
    if recipe.data.prepare:
        stages.append(("prepare", prepare_stage))
    if recipe.base_adapter is not None:
        stages.append(("base", base_stage))
    stages += [("utility", utility_stage), ("safety", safety_stage)]
    if recipe.toss.rounds:
        stages.append(("refine", refine_stage))
    stages += [("score", score_stage), ("select", select_stage), ("final", final_stage)]
    stages += [(name, standard_sft_stage) for name in dict.fromkeys(recipe.baselines)]
    if (any(getattr(recipe.data, name) for name in ("eval_harmful", "eval_edgy", "eval_task",
                                                     "eval_prefill"))
            or recipe.data.eval_harmful_sets):
        stages.append(("eval", eval_stage))
    stages.append(("report", report_stage))
    if any(f != "none" for f in recipe.export):
        stages.append(("export", export_stage))
    return stages


def run_stages(recipe: Recipe, layout: RunLayout, stages: list[tuple[str, StageFn]],
               say: Callable[[str], None]) -> Upstream:
    """Run each stage unless the manifest says it is done with the same key."""
    manifest = Manifest(layout.manifest)
    upstream: Upstream = {}
    for name, stage_fn in stages:
        plan = stage_fn(recipe, layout, upstream)
        key = stage_key(plan.settings)
        if manifest.done(name, key):
            say(f"[{name}] unchanged, skipped")
            upstream[name] = manifest.outputs(name)
            continue
        resume = manifest.started_with(name, key)
        say(f"[{name}] {'resuming' if resume else 'running'}")
        manifest.record(name, key=key, status="running", started=time.time(),
                        settings=_settings_record(plan.settings))
        tic = time.time()
        layout.stage_dir(name).mkdir(parents=True, exist_ok=True)
        outputs = plan.run(resume, say)
        manifest.record(name, status="done", outputs={k: str(v) for k, v in outputs.items()},
                        seconds=round(time.time() - tic, 1))
        upstream[name] = {k: Path(v) for k, v in outputs.items()}
    return upstream


def run(recipe_path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None,
        only_until: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate the recipe, then run its stages in RUN_DIR (--out, default runs/<name>)."""
    recipe, base = load_recipe(recipe_path, overrides)
    layout = RunLayout(run_dir_of(recipe, out), base)
    if not recipe.data.prepare:  # non-UTF-8 data stops here, not after two trainings
        check_text_files([p for p in data_files(recipe, layout, {}).values() if p is not None]
                         + list(harmful_sets(recipe, layout).values()))
    check_writable(layout.run_dir, "run folder", folder=True)
    stages = stages_of(recipe)
    if only_until:
        names = [name for name, _ in stages]
        if only_until not in names:
            raise TossError(f"--until {only_until}: not a stage of this recipe ({', '.join(names)})")
        stages = stages[:names.index(only_until) + 1]
    if layout.run_dir.exists() and not layout.run_dir.is_dir():
        raise TossError(f"{layout.run_dir}: exists and is not a folder; choose another --out")
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    hold(layout.run_dir)  # one `toss-mlx run` per run folder at a time
    # Top-level keys the report reads to find the model and the data of a run.
    Manifest(layout.manifest).describe(recipe=_settings_record(recipe), model=recipe.model)
    upstream = run_stages(recipe, layout, stages, say)
    custom = data_files(recipe, layout, upstream)["custom"]
    Manifest(layout.manifest).describe(data=str(custom), model=base_model(recipe, upstream))
    outputs = {stage: {k: str(v) for k, v in out.items()} for stage, out in upstream.items()}
    result = {"run_dir": str(layout.run_dir), "recipe": recipe.name, "outputs": outputs}
    if "select" in upstream:
        result["detector"] = detector_quality(upstream["score"]["scores"], upstream["select"]["mask"],
                                              custom, recipe.train.skip_bad_rows or False)
    if "eval" in upstream:
        result["eval"] = read_json(upstream["eval"]["eval"]).get("models")
        if "standard_sft" in recipe.baselines:
            from .evaluate.compare import compare_models

            result["comparison"] = {"name": "toss", "other": "standard_sft",
                                    "diffs": compare_models(result["eval"], "toss", "standard_sft")}
    write_json(layout.summary, result)
    return result


def detector_quality(scores_path: Path, mask_path: Path, data_path: Path,
                     skip_bad_rows: bool = False) -> dict[str, Any] | None:
    """Where removed tokens fall, when the data says which rows are harmful (`source` field):
    `layout.detector_figures` (precision, recall, answer openings removed) of the harmful rows."""
    from .data import read_rows
    from .io import load_arrays
    from .layout import detector_figures, removal_by_group

    harmful_rows = {r.index for r in read_rows(data_path, skip_bad_rows=skip_bad_rows)
                    if r.data.get("source") == "harmful"}
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
    if result.get("comparison"):
        lines.append(comparison_line(result["comparison"]))
    outputs = result.get("outputs", {})
    for stage, key in (("report", "report"), ("export", "export"), ("final", "adapter")):
        if stage in outputs:
            lines.append(f"{stage}: {Path(outputs[stage][key]).parent if key == 'adapter' else outputs[stage][key]}")
    return "\n".join(lines)


COMPARED = (("refusal_rate", "AdvBench refusal"), ("prefill_recovery@10", "prefill recovery K=10"),
            ("over_refusal_rate", "edgy over-refusal"), ("nll", "task NLL"))


def comparison_line(comparison: dict[str, Any]) -> str:
    """One line: TOSS beside standard SFT on the same data, each difference with its paired
    95% interval over prompts (`evaluate.compare`)."""
    diffs = comparison["diffs"]
    parts = [f"{label} {d['value']:.3f} vs {d['other']:.3f} ({d['diff']:+.3f} "
             f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], n={d['n']})"
             for key, label in COMPARED if (d := diffs.get(key))]
    names = {"toss": "TOSS", "standard_sft": "standard SFT"}
    name, other = (names.get(comparison[k], comparison[k]) for k in ("name", "other"))
    return (f"{name} vs {other}, same data (difference, 95% paired interval over prompts): "
            + "; ".join(parts))


STARTER_RECIPE = (Path(__file__).parent / "starter_recipe.yaml")


def write_starter(path: str | Path, force: bool = False) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise TossError(f"{path}: exists; pass --force to overwrite")
    write_text(path, STARTER_RECIPE.read_text())
