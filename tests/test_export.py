"""`toss-mlx export`: mlx-lm and PEFT layouts, verified against transformers + peft logits."""

import importlib.util
import json

import numpy as np
import pytest
from adapters import TOKENS, make_adapter, mlx_logits
from safetensors.numpy import load_file, save_file

from toss_mlx.export import export_adapter, read_adapter, render_readme
from toss_mlx.io import TossError
from toss_mlx.models.load import load_model

HAS_TORCH_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers"))
needs_torch = pytest.mark.skipif(
    not HAS_TORCH_PEFT,
    reason="needs torch + peft + transformers (pip install torch==2.13.0 peft)")

# (name, dora, num_layers, targets): LoRA and DoRA, every layer and only the last one.
CASES = [
    ("lora-all", False, -1, ("q_proj", "v_proj")),
    ("lora-last", False, 1, ("q_proj", "o_proj", "gate_proj", "down_proj")),
    ("dora-all", True, -1, ("q_proj", "k_proj", "v_proj", "up_proj")),
    ("dora-last", True, 1, ("v_proj", "down_proj")),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tiny_model_dir, tmp_path_factory):
    name, dora, num_layers, targets = request.param
    folder = make_adapter(tiny_model_dir, tmp_path_factory.mktemp(name) / "adapter",
                          dora=dora, num_layers=num_layers, targets=targets, rank=4, alpha=8.0)
    return folder, dora, num_layers, targets


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), quiet=True)
    return mlx_logits(model)


def test_peft_layout(case, tmp_path):
    folder, dora, num_layers, targets = case
    out = export_adapter(folder, tmp_path / "peft", fmt="peft", base_model_id="me/tiny-base")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8  # scale 2 * rank 4
    assert config["target_modules"] == sorted(targets)
    assert config["layers_to_transform"] == ([1] if num_layers == 1 else None)
    assert config["bias"] == "none" and config["use_dora"] is dora
    assert config["base_model_name_or_path"] == "me/tiny-base"

    mine = load_file(str(folder / "adapters.safetensors"))
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    layers = [1] if num_layers == 1 else [0, 1]
    assert len(mine) == len(peft) == len(layers) * len(targets) * (3 if dora else 2)
    for name, w in mine.items():
        path, leaf = name.rsplit(".", 1)
        key = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}[leaf]
        np.testing.assert_array_equal(peft[f"base_model.model.{path}.{key}"], w.T)
    assert len(out.modules) == len(layers) * len(targets)


@needs_torch
def test_peft_logits_match_transformers(case, tmp_path, tiny_model_dir, base_logits):
    """The exported adapter, loaded by peft onto the same base in transformers, gives MLX's logits."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    folder, *_ = case
    export_adapter(folder, tmp_path / "peft", fmt="peft")
    model, _ = load_model(str(tiny_model_dir), adapter_path=str(folder), quiet=True)
    expected = mlx_logits(model)
    assert np.abs(expected - base_logits).max() > 0.5, "the adapter must visibly change the logits"

    hf = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = hf(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(hf_base, base_logits, atol=1e-4)  # same base in both frameworks
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_mlx_export_round_trip(case, tmp_path, tiny_model_dir):
    from mlx_lm import load

    folder, *_ = case
    export_adapter(folder, tmp_path / "mlx")
    for name in ("adapter_config.json", "adapters.safetensors"):
        assert (tmp_path / "mlx" / name).read_bytes() == (folder / name).read_bytes()
    model, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "mlx"))
    reference, _ = load_model(str(tiny_model_dir), adapter_path=str(folder), quiet=True)
    np.testing.assert_allclose(mlx_logits(model), mlx_logits(reference), atol=1e-5)
    assert "mlx_lm.generate" in (tmp_path / "mlx" / "README.md").read_text()


def test_readme_training_record_and_loading(tiny_model_dir, tmp_path):
    toss = {"ratio": 0.1, "strategy": "toss", "level": "global", "rounds": 2,
            "base_model": "smollm2-135m-instruct"}
    folder = make_adapter(tiny_model_dir, tmp_path / "a", extra={"toss": toss, "iters": 300})
    export_adapter(folder, tmp_path / "peft", fmt="peft")
    text = (tmp_path / "peft" / "README.md").read_text()
    for needle in ('`ratio`: 0.1', '`strategy`: "toss"', '`rounds`: 2', '`iters`: 300',
                   "HuggingFaceTB/SmolLM2-135M-Instruct", "PeftModel.from_pretrained",
                   "--enable-lora", "convert_lora_to_gguf.py", "ADAPTER", "quantized bases"):
        assert needle in text, needle
    # The registry name maps to its hub id for PEFT; an explicit id wins.
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    bare = read_adapter(make_adapter(tiny_model_dir, tmp_path / "b"))
    text = render_readme(bare, "mlx", None)
    assert "No toss-mlx training record" in text and "--base-model-id" in text


def test_readme_reads_the_mask_metadata(tiny_model_dir, tmp_path):
    from toss_mlx.io import save_arrays

    folder = make_adapter(tiny_model_dir, tmp_path / "a")
    mask = folder / "mask.safetensors"
    save_arrays(mask, {"keep": np.ones(3, np.uint8)}, {"ratio": 0.2, "strategy": "toss", "level": "global"})
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "toss": {"mask": str(mask)}}))
    text = render_readme(read_adapter(folder), "peft", None)
    assert "mask file's metadata" in text
    for needle in ('`ratio`: 0.2', '`strategy`: "toss"', '`level`: "global"'):
        assert needle in text, needle
    mask.unlink()  # a mask gone by export time: the README just says less
    assert "mask file's metadata" not in render_readme(read_adapter(folder), "peft", None)
    # A mask outside the adapter folder is never read (the path comes from a file).
    outside = tmp_path / "outside.safetensors"
    save_arrays(outside, {"keep": np.ones(3, np.uint8)}, {"secret": "do-not-publish"})
    (folder / "adapter_config.json").write_text(json.dumps({**config, "toss": {"mask": str(outside)}}))
    text = render_readme(read_adapter(folder), "peft", None)
    assert "do-not-publish" not in text and "mask file's metadata" not in text
    # What train records in the adapter config is shown instead.
    toss = {"mask": str(outside), "selection": {"ratio": 0.1, "strategy": "random"}}
    (folder / "adapter_config.json").write_text(json.dumps({**config, "toss": toss}))
    text = render_readme(read_adapter(folder), "peft", None)
    assert '`selection.ratio`: 0.1' in text and '`strategy`: "random"' in text


def test_readme_quotes_values_from_the_config(tiny_model_dir, tmp_path):
    import shlex

    folder = make_adapter(tiny_model_dir, tmp_path / "a")
    adapter = read_adapter(folder)
    evil = 'org/m"; rm -rf ~ #'
    mlx = render_readme(adapter, "mlx", evil)
    assert f"--model {shlex.quote(evil)} --adapter-path" in mlx
    assert f"load({json.dumps(evil)}, adapter_path" in mlx
    peft = render_readme(adapter, "peft", evil)
    assert "FROM BASE_MODEL" in peft and f"from_pretrained({json.dumps(evil)})" in peft
    assert f"vllm serve {shlex.quote(evil)} --enable-lora" in peft
    # A newline would start a new command or Modelfile line: such a name is no model id.
    lines = 'org/m\nFROM x\n`x`'
    for fmt in ("mlx", "peft"):
        text = render_readme(adapter, fmt, lines)
        assert "\nFROM x" not in text and "BASE_MODEL" in text


def test_recorded_mlx_lm_model_key(tiny_model_dir, tmp_path):
    folder = make_adapter(tiny_model_dir, tmp_path / "a", extra={"model": "org/base"})
    export_adapter(folder, tmp_path / "peft", fmt="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("plain") / "adapter")


def copy_adapter(src, dst, config=None, weights=None):
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))
    arrays = load_file(str(src / "adapters.safetensors"))
    save_file(weights(arrays) if weights else arrays, str(dst / "adapters.safetensors"))
    return dst


def test_bad_input(adapter, tmp_path):
    def fails(folder, match, **kw):
        with pytest.raises(TossError, match=match):
            export_adapter(folder, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()

    fails(tmp_path / "missing", "adapter folder not found")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "not an mlx-lm adapter folder")
    (tmp_path / "peftlike").mkdir()
    (tmp_path / "peftlike" / "adapter_model.safetensors").write_bytes(b"x")
    fails(tmp_path / "peftlike", "looks like a PEFT adapter")
    fails(adapter, "unknown export format 'onnx'", fmt="onnx")

    bad_json = copy_adapter(adapter, tmp_path / "badjson")
    (bad_json / "adapter_config.json").write_text('{"num_layers": 2,')
    fails(bad_json, r"adapter_config.json:1: malformed JSON")
    fails(copy_adapter(adapter, tmp_path / "full", config=lambda c: {**c, "fine_tune_type": "full"}),
          "fine_tune_type 'full' is not a LoRA/DoRA adapter")
    fails(copy_adapter(adapter, tmp_path / "noparams",
                       config=lambda c: {k: v for k, v in c.items() if k != "lora_parameters"}),
          "lora_parameters with rank and scale are missing")
    corrupt = copy_adapter(adapter, tmp_path / "corrupt")
    (corrupt / "adapters.safetensors").write_bytes(b"not safetensors at all")
    fails(corrupt, "not a readable safetensors adapter")
    fails(copy_adapter(adapter, tmp_path / "stray",
                       weights=lambda w: {**w, "model.layers.0.mlp.up_proj.weight": np.ones((2, 2), np.float32)}),
          "up_proj.weight is not a LoRA/DoRA weight")
    fails(copy_adapter(adapter, tmp_path / "half",
                       weights=lambda w: {k: v for k, v in w.items() if not k.endswith("lora_b")}),
          r"needs \['lora_a', 'lora_b'\]")
    fails(copy_adapter(adapter, tmp_path / "rank", config=lambda c: {
        **c, "lora_parameters": {**c["lora_parameters"], "rank": 8}}), "do not match rank 8", fmt="peft")


def test_refuses_what_peft_cannot_hold(adapter, tmp_path):
    r, h = 4, 64

    def refuses(name, weights, match, config=None):
        folder = copy_adapter(adapter, tmp_path / name, config=config, weights=lambda _: weights)
        with pytest.raises(TossError, match=match):
            export_adapter(folder, tmp_path / f"{name}-out", fmt="peft")
        export_adapter(folder, tmp_path / f"{name}-mlx")  # the mlx layout still takes it

    moe = "model.layers.1.mlp.switch_mlp.up_proj"
    refuses("moe", {f"{moe}.lora_a": np.ones((r * 4, h), np.float32),
                    f"{moe}.lora_b": np.ones((4, 128, r), np.float32)}, "mixture-of-experts")
    emb = "model.embed_tokens"
    refuses("emb", {f"{emb}.lora_a": np.ones((400, r), np.float32),
                    f"{emb}.lora_b": np.ones((r, h), np.float32)}, "embedding")
    other = "language_model.model.layers.0.self_attn.q_proj"
    refuses("tree", {f"{other}.lora_a": np.ones((h, r), np.float32),
                     f"{other}.lora_b": np.ones((r, h), np.float32)}, "outside model.layers.N")
    q = "model.layers.1.self_attn.q_proj"
    refuses("head", {f"{q}.lora_a": np.ones((h, r), np.float32), f"{q}.lora_b": np.ones((r, h), np.float32),
                     "lm_head.lora_a": np.ones((h, r), np.float32),
                     "lm_head.lora_b": np.ones((r, 400), np.float32)}, "lm_head and only some layers")


def test_output_folder_safety(adapter, tmp_path, monkeypatch):
    import mlx.core as mx

    with pytest.raises(TossError, match="would replace the input"):
        export_adapter(adapter, adapter, fmt="peft")
    with pytest.raises(TossError, match="would replace the input"):
        export_adapter(adapter, adapter.parent, fmt="peft")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TossError, match="holds other files"):
        export_adapter(adapter, foreign, fmt="peft")
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "out"
    export_adapter(adapter, out, fmt="mlx")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A failure mid-export leaves the earlier export untouched and no temp folder behind.
    monkeypatch.setattr(mx, "save_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_adapter(adapter, out, fmt="peft")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]
    monkeypatch.undo()
    export_adapter(adapter, out, fmt="peft")  # an earlier export is replaced
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                     "adapter_model.safetensors"]


def test_cli(adapter, tmp_path):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(adapter), "--format", "peft", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "exported LoRA adapter (4 modules, rank 4) as peft" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert "adapter folder not found" in result.output and "Traceback" not in result.output


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_logits_match_transformers_smollm2(dora, smollm2_dir, tmp_path):
    """The same check on the real SmolLM2-135M (30 layers, GQA): module paths and scales hold."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", dora=dora, num_layers=8, rank=8,
                           alpha=16.0, amplitude=0.05,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    export_adapter(adapter, tmp_path / "peft", fmt="peft")
    base, tokenizer = load_model(str(smollm2_dir), quiet=True)
    tokens = tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    base_logits = mlx_logits(base, tokens)
    model, _ = load_model(str(smollm2_dir), adapter_path=str(adapter), quiet=True)
    expected = mlx_logits(model, tokens)
    assert np.abs(expected - base_logits).max() > 0.5

    hf = LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(got, expected, atol=5e-4)  # logits reach about 30; float32 over 30 layers
