"""Export an mlx-lm adapter where users serve it: mlx-lm's own layout or a PEFT LoRA folder.

mlx-lm stores, per adapted module, `<path>.lora_a` (in, r) and `<path>.lora_b`
(r, out) and computes y = W x + scale * (x A) B; PEFT stores
`base_model.model.<path>.lora_A.weight` (r, in) and `lora_B.weight` (out, r)
and scales by lora_alpha / r. So the export transposes both and sets
lora_alpha = scale * r. DoRA's magnitude `m` is PEFT's `lora_magnitude_vector`:
both rescale each output row of (W + scale B A) by m / ||row||, with the norm
treated as a constant, so the vector carries over unchanged.

mlx-lm's module paths (`model.layers.N.self_attn.q_proj`) are the Hugging Face
ones for the llama family; adapters on anything else (mixture-of-experts
stacks, embeddings, other module trees) have no checked PEFT form and are
refused. Every export also gets a README.md that says what the adapter is,
how it was trained and how to load it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .checks import check_writable, read_adapter_config
from .io import TossError, atomic_dir, write_failed, write_json, write_text

FORMATS = ("mlx", "peft", "gguf", "gguf-lora", "ollama")  # the last three: export_gguf.py
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
README_MARK = "<!-- written by toss-mlx export -->"
# Registry names whose Hugging Face id is known, for base_model_name_or_path.
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Config keys that describe the adapter's structure rather than its training.
STRUCTURE_KEYS = {"fine_tune_type", "num_layers", "lora_parameters", "toss"}
LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBEDDING_LEAVES = {"embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embedding"}


@dataclass
class Adapter:
    """An mlx-lm adapter read from disk: its config and weights grouped by module path."""

    folder: Path
    config: dict[str, Any]
    modules: dict[str, dict[str, mx.array]]  # module path -> {"lora_a", "lora_b"[, "m"]}

    @property
    def dora(self) -> bool:
        return self.config.get("fine_tune_type", "lora") == "dora"

    @property
    def params(self) -> dict[str, Any]:
        return self.config["lora_parameters"]

    @property
    def rank(self) -> int:
        return int(self.params["rank"])

    @property
    def scale(self) -> float:
        return float(self.params["scale"])


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """Read and check an mlx-lm adapter folder; bad input raises TossError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TossError(f"{folder}: adapter folder not found")
    config_path, weights_path = folder / "adapter_config.json", folder / "adapters.safetensors"
    if not config_path.exists() or not weights_path.exists():
        hint = ""
        if (folder / "adapter_model.safetensors").exists():
            hint = " (it looks like a PEFT adapter; export and fuse take mlx-lm adapters)"
        raise TossError(f"{folder}: not an mlx-lm adapter folder: needs adapter_config.json "
                        f"and adapters.safetensors{hint}")
    config = read_adapter_config(folder)  # an object; num_layers, rank, scale of the right types
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise TossError(f"{config_path}: fine_tune_type {kind!r} is not a LoRA/DoRA adapter "
                        "(a full fine-tune has no adapter to export)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
        raise TossError(f"{config_path}: lora_parameters with rank and scale are missing")
    try:
        weights = mx.load(str(weights_path))
    except Exception as e:  # mlx raises RuntimeError/ValueError for unreadable files
        raise TossError(f"{weights_path}: not a readable safetensors adapter ({e})") from None
    if not weights:
        raise TossError(f"{weights_path}: holds no weights")

    modules: dict[str, dict[str, mx.array]] = {}
    for name, w in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ADAPTER_LEAVES or not path:
            raise TossError(f"{weights_path}: {name} is not a LoRA/DoRA weight "
                            f"(names end in {', '.join(ADAPTER_LEAVES)})")
        modules.setdefault(path, {})[leaf] = w
    need = {"lora_a", "lora_b", "m"} if kind == "dora" else {"lora_a", "lora_b"}
    for path, leaves in modules.items():
        if set(leaves) != need:
            raise TossError(f"{weights_path}: {path} has {sorted(leaves)}, "
                            f"a {kind} module needs {sorted(need)}")
    return Adapter(folder, config, dict(sorted(modules.items(), key=lambda kv: _path_key(kv[0]))))


def _path_key(path: str) -> tuple:
    """Sort module paths with layer numbers in numeric order."""
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


# ---------------------------------------------------------------------------------------------
# PEFT


def _peft_module(path: str, leaves: dict[str, mx.array], rank: int) -> None:
    """Refuse a module whose adapter has no faithful PEFT LoRA form."""
    leaf = path.rsplit(".", 1)[-1]
    a, b = leaves["lora_a"], leaves["lora_b"]
    if "switch_mlp" in path.split(".") or "experts" in path.split(".") or a.ndim != 2 or b.ndim != 2:
        raise TossError(f"{path}: a LoRA on stacked mixture-of-experts weights has no PEFT LoRA "
                        "form; use --format mlx or fuse it into the model (toss-mlx fuse)")
    if leaf in EMBEDDING_LEAVES or "embed" in leaf:
        raise TossError(f"{path}: a LoRA on an embedding is not exported to PEFT (mlx-lm also "
                        "applies it to a tied output head, PEFT does not); use --format mlx or fuse")
    if not (LAYER_PATH.match(path) or path == "lm_head"):
        raise TossError(f"{path}: module path outside model.layers.N / lm_head, where mlx-lm's "
                        "names are not known to match the Hugging Face model's; use --format mlx "
                        "or fuse")
    if a.shape[1] != rank or b.shape[0] != rank:
        raise TossError(f"{path}: LoRA shapes {tuple(a.shape)} x {tuple(b.shape)} do not match "
                        f"rank {rank} of adapter_config.json")
    if "m" in leaves and leaves["m"].shape != (b.shape[1],):
        raise TossError(f"{path}: DoRA magnitude of shape {tuple(leaves['m'].shape)} does not "
                        f"match the output size {b.shape[1]}")


def to_peft(adapter: Adapter, base_model: str | None) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Return (weights, adapter_config) of the equivalent PEFT LoRA/DoRA adapter."""
    rank = adapter.rank
    weights: dict[str, mx.array] = {}
    layers: set[int] = set()
    targets: set[str] = set()
    outside_layers = False
    for path, leaves in adapter.modules.items():
        _peft_module(path, leaves, rank)
        if (m := LAYER_PATH.match(path)) is not None:
            layers.add(int(m.group(1)))
        else:
            outside_layers = True
        targets.add(path.rsplit(".", 1)[-1])
        prefix = f"base_model.model.{path}"
        weights[f"{prefix}.lora_A.weight"] = leaves["lora_a"].T
        weights[f"{prefix}.lora_B.weight"] = leaves["lora_b"].T
        if adapter.dora:
            weights[f"{prefix}.lora_magnitude_vector"] = leaves["m"]

    # mlx-lm adapts the last num_layers layers, so adapters starting at layer 0 cover them all.
    some_layers = bool(layers) and min(layers) > 0
    if some_layers and outside_layers:
        raise TossError("this adapter touches lm_head and only some layers; PEFT's "
                        "layers_to_transform would drop the lm_head part; use --format mlx or fuse")
    alpha = adapter.scale * rank
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(adapter.params.get("dropout", 0.0)),
        "target_modules": sorted(targets),
        "layers_to_transform": sorted(layers) if some_layers else None,
        "bias": "none",
        "use_dora": adapter.dora,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return weights, config


# ---------------------------------------------------------------------------------------------
# README


def recorded_base_model(config: dict[str, Any]) -> str | None:
    """The base model the adapter's config names, if any (toss-mlx or mlx_lm.lora keys)."""
    toss = config.get("toss") if isinstance(config.get("toss"), dict) else {}
    for value in (toss.get("base_model"), toss.get("model"), config.get("base_model"),
                  config.get("model")):
        if isinstance(value, str) and value:
            return value
    return None


def hub_id(base_model: str | None) -> str | None:
    """A Hugging Face id for PEFT's base_model_name_or_path (registry names mapped)."""
    if base_model is None:
        return None
    return HUB_IDS.get(base_model, base_model)


def _layer_summary(adapter: Adapter) -> str:
    layers = sorted({int(m.group(1)) for p in adapter.modules if (m := LAYER_PATH.match(p))})
    if not layers:
        return "no transformer layer"
    if layers == list(range(layers[0], layers[-1] + 1)):
        span = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
    else:
        span = ", ".join(map(str, layers))
    return f"layer{'s' if len(layers) > 1 else ''} {span}"


def _code(text: Any) -> str:
    """`text` as one Markdown code span: no newline, fenced by more backticks than it holds."""
    text = " ".join(str(text).split())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _markdown_text(text: str) -> str:
    """Plain Markdown text: characters that would start markup (links, HTML, code) escaped."""
    return re.sub(r"([\\`*_\[\]<>|!])", r"\\\1", " ".join(text.split()))


# Values from a file that go into a README snippet are quoted for that snippet's language:
# a base model "x; rm -rf ~" or with a newline must stay one harmless argument.
def _sh(value: str) -> str:
    return shlex.quote(value) if value != "BASE_MODEL" else value


def _py(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid Python string literal


def _modelfile(value: str) -> str:
    # A Modelfile has no quoting: anything but a plain model name or path becomes the placeholder.
    return value if re.fullmatch(r"[A-Za-z0-9._/:@~+-]+", value) else "BASE_MODEL"


def _settings_lines(items: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in items.items():
        if isinstance(value, dict):
            lines += _settings_lines(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)) and len(value) > 8:
            lines.append(f"- {_code(f'{prefix}{key}')}: {len(value)} values")
        else:
            lines.append(f"- {_code(f'{prefix}{key}')}: {_markdown_text(json.dumps(value))}")
    return lines


def _mask_metadata(path: str, folder: Path) -> dict[str, Any]:
    """The string metadata of the selection mask the adapter was trained with, if still readable.

    Only a mask inside the adapter folder is read: the path comes from the adapter's
    config, and export must not read (and publish) whatever file a config names.
    """
    from safetensors import safe_open

    p = Path(path) if Path(path).is_absolute() else folder / path
    if folder.resolve() not in p.resolve().parents:
        return {}
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # moved, deleted or not a mask: the README just says less
        return {}

    def decode(value: str) -> Any:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value

    return {k: decode(v) for k, v in sorted(meta.items())}


def render_readme(adapter: Adapter, fmt: str, base_model: str | None) -> str:
    """The README.md of an export: what it is, how it was trained, how to load it."""
    kind = "DoRA" if adapter.dora else "LoRA"
    targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})
    base = _code(base_model) if base_model else \
        "unknown (not recorded in adapter_config.json; pass --base-model-id)"
    if base_model and (base_model.startswith(("/", ".", "~")) or Path(base_model).exists()):
        base += " (a local folder; pass --base-model-id with its hub id when sharing)"
    # A name with a newline or other control character is no model id: the placeholder instead.
    base_arg = base_model if base_model and base_model.isprintable() else "BASE_MODEL"
    alpha = adapter.scale * adapter.rank
    lines = [
        f"# {kind} adapter exported by toss-mlx ({'PEFT' if fmt == 'peft' else 'mlx-lm'} format)",
        README_MARK,
        "",
        f"- Base model: {base}",
        f"- Adapter: {kind}, rank {adapter.rank}, scale {adapter.scale:g} "
        f"(PEFT lora_alpha {alpha:g}), dropout {adapter.params.get('dropout', 0.0)}",
        f"- Adapted modules: {', '.join(targets)} in {_layer_summary(adapter)} "
        f"({len(adapter.modules)} modules; mlx-lm num_layers={adapter.config.get('num_layers')})",
        f"- Exported from: {_code(adapter.folder)}",
        "",
        "## How it was trained",
        "",
    ]
    toss = adapter.config.get("toss")
    if isinstance(toss, dict) and toss:
        how = ("with a token mask: the response tokens that TOSS selection flagged as riskiest "
               "were left out of the loss (they stayed in the input as context)"
               if toss.get("mask") else "on every response token (no token mask)")
        lines += [f"With `toss-mlx train`, {how}. Recorded settings:", ""]
        lines += _settings_lines(toss)
        selection = toss.get("selection") if isinstance(toss.get("selection"), dict) else None
        if selection is None and isinstance(toss.get("mask"), str):
            selection = _mask_metadata(toss["mask"], adapter.folder) or None
        if selection:
            lines += ["", f"Token selection, from the mask file's metadata ({_code(toss.get('mask'))}):",
                      ""]
            lines += _settings_lines(selection)
    else:
        lines.append("No toss-mlx training record in adapter_config.json.")
    other = {k: v for k, v in adapter.config.items() if k not in STRUCTURE_KEYS}
    if other:
        lines += ["", "Other settings recorded in adapter_config.json:", ""]
        lines += _settings_lines(other)
    lines += ["", "## How to load it", ""]
    if fmt == "peft":
        lines += [
            "transformers + PEFT:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"base = AutoModelForCausalLM.from_pretrained({_py(base_arg)})",
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
            "model = model.merge_and_unload()  # optional: fold the adapter into the weights",
            "```",
            "",
            "vLLM" + (" (serves LoRA, not DoRA adapters: merge this one into the model first, "
                      "with PEFT's merge_and_unload or `toss-mlx fuse --dequantize`, and serve "
                      "the merged model)" if adapter.dora else "") + ":",
            "",
            "```sh",
            f"vllm serve {_sh(base_arg)} --enable-lora --max-lora-rank {max(16, adapter.rank)} "
            "--lora-modules toss=THIS_FOLDER",
            "```",
            "",
            "llama.cpp (convert to a GGUF adapter next to a GGUF of the same base; "
            "LoRA only" + (": merge this DoRA adapter into the model first" if adapter.dora else "")
            + "; `toss-mlx export ADAPTER --format gguf-lora` writes that GGUF directly, "
            "`--format gguf` the fused model):",
            "",
            "```sh",
            "python convert_lora_to_gguf.py THIS_FOLDER --base BASE_MODEL_HF_FOLDER "
            "--outtype f16 --outfile adapter.gguf",
            "llama-cli -m base.gguf --lora adapter.gguf",
            "```",
            "",
            "Ollama (`Modelfile`; `ADAPTER` takes the GGUF above or this safetensors folder):",
            "",
            "```",
            f"FROM {_modelfile(base_arg)}",
            "ADAPTER ./adapter.gguf",
            "```",
        ]
    else:
        lines += [
            "mlx-lm:",
            "",
            "```sh",
            f"mlx_lm.generate --model {_sh(base_arg)} --adapter-path THIS_FOLDER --prompt \"Hello\"",
            f"toss-mlx fuse --model {_sh(base_arg)} --adapter THIS_FOLDER --out fused-model",
            "```",
            "",
            "```python",
            "from mlx_lm import load",
            f'model, tokenizer = load({_py(base_arg)}, adapter_path="THIS_FOLDER")',
            "```",
            "",
            "For transformers + PEFT, vLLM, llama.cpp or Ollama, export with "
            "`toss-mlx export THIS_FOLDER --format peft --out DIR`.",
        ]
    lines += [
        "",
        "## Warning: quantized bases",
        "",
        "An adapter learns corrections for the exact base weights it was trained on. If that base "
        "was quantized (e.g. 4-bit, or a model imported from a quantized GGUF), applying the "
        "adapter to the full-precision model (or to a different quantization) shifts its outputs, "
        "and the safety behaviour the training preserved can drift with them. Serve it on the "
        "same base it was trained on, or check it there again (`toss-mlx eval`).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Export


def is_earlier_output(folder: Path, mark: str = README_MARK) -> bool:
    """True for a folder of plain files whose README.md carries `mark`: an earlier output of
    the command that writes that mark (export's by default; fuse passes its own), so it is
    safe to replace."""
    readme = folder / "README.md"
    return (all(p.is_file() for p in folder.iterdir()) and readme.exists()
            and mark in readme.read_text(errors="replace"))


def check_output(out: Path, *sources: Path) -> None:
    """Refuse an output folder that is, or holds, one of the inputs (replacing it loses them)."""
    out = out.resolve()
    for src in sources:
        src = src.resolve()
        if src == out or out in src.parents:
            raise TossError(f"{out}: the output folder would replace the input {src}; "
                            "choose another --out")
        if src in out.parents:
            raise TossError(f"{out}: the output folder is inside the input {src}; "
                            "choose an --out outside it")


def export_adapter(adapter_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "mlx",
                   base_model_id: str | None = None, model: str | None = None,
                   quant: str = "f16", system_prompt: str | None = None):
    """Write the adapter in `fmt` plus a README.md to `out`, atomically.

    "mlx" and "peft" return the Adapter; the GGUF formats ("gguf", "gguf-lora", "ollama",
    on base `model`, default the one the adapter records) return export_gguf.GGUFExport.
    """
    if fmt not in FORMATS:
        raise TossError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt not in ("mlx", "peft"):
        from .export_gguf import export_gguf

        return export_gguf(adapter_dir, out, fmt, model=model, quant=quant,
                           system_prompt=system_prompt)
    adapter = read_adapter(adapter_dir)
    out = Path(out)
    check_output(out, adapter.folder)
    check_writable(out, "export folder", folder=True)
    base_model = base_model_id or recorded_base_model(adapter.config)
    if fmt == "peft":
        weights, peft_config = to_peft(adapter, hub_id(base_model))
        base_model = peft_config["base_model_name_or_path"]
    with atomic_dir(out, replaceable=is_earlier_output) as tmp:
        if fmt == "peft":
            write_json(tmp / "adapter_config.json", peft_config)
            try:
                mx.save_safetensors(str(tmp / "adapter_model.safetensors"), weights,
                                    metadata={"format": "pt"})
            except RuntimeError as e:  # mlx's "[write] Unable to write": usually a full disk
                raise write_failed(out / "adapter_model.safetensors", e) from None
        else:
            shutil.copyfile(adapter.folder / "adapter_config.json", tmp / "adapter_config.json")
            shutil.copyfile(adapter.folder / "adapters.safetensors", tmp / "adapters.safetensors")
        write_text(tmp / "README.md", render_readme(adapter, fmt, base_model))
    return adapter
