"""GGUF export (fused model, llama.cpp LoRA, Ollama folder) of tiny llama / qwen2 / gemma3 models.

The layout is checked against naive loops (llama.cpp's q/k row order, Gemma's
1 + w norms, LoRA A/B orientation), the weights against `toss-mlx fuse`'s
folder, the llama file by `toss-mlx model import` (an independent reader: mx.load
decodes the blocks), and every architecture by llama.cpp itself when
llama-cpp-python is installed (tests/test_export_llama_cpp.py).
"""

import importlib.util
import json

import numpy as np
import pytest
from adapters import TOKENS, make_adapter, mlx_logits
from safetensors.numpy import load_file, save_file
from tiny_archs import build_arch_folder

from toss_mlx.export import export_adapter
from toss_mlx.export_gguf import CHECK_TEXT, chat_segments, export_gguf, render_segments
from toss_mlx.io import TossError
from toss_mlx.models.load import load_model

ARCHS = ["llama", "mistral", "qwen2", "gemma3_text"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def gguf_file(path):
    import gguf

    return gguf.GGUFReader(str(path))


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def tensors(reader) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}


def types(reader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}


def llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, by a loop: within each head, row 2i+j takes HF row j*(d/2)+i."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for j in (0, 1):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    """(model_type, model folder, adapter folder, fused folder from `toss-mlx fuse`)."""
    from toss_mlx.fuse import fuse_adapter

    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = build_arch_folder(root / "model", kind)
    adapter = make_adapter(model, root / "adapter", targets=TARGETS, rank=4, alpha=8.0)
    fuse_adapter(str(model), adapter, root / "fused")
    return kind, model, adapter, root / "fused"


@pytest.fixture(scope="module")
def exports(arch, tmp_path_factory):
    kind, model, adapter, _ = arch
    root = tmp_path_factory.mktemp(f"{kind}-exports")
    return {
        "f16": export_gguf(adapter, root / "f16", model=str(model)),
        "q8_0": export_gguf(adapter, root / "q8_0", model=str(model), quant="q8_0"),
        "lora": export_gguf(adapter, root / "lora", fmt="gguf-lora", model=str(model)),
    }


def test_fused_layout_and_metadata(arch, exports):
    kind, model, _, fused = arch
    config = json.loads((model / "config.json").read_text())
    reader = gguf_file(exports["f16"].out / "model-f16.gguf")
    want_arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[kind]
    assert field(reader, "general.architecture") == want_arch
    assert field(reader, "general.type") == "model"
    assert field(reader, f"{want_arch}.block_count") == 2
    assert field(reader, f"{want_arch}.attention.head_count_kv") == 2
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"  # tiny.py: digits split, then GPT-2
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # control x3, normal
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    assert len(field(reader, "tokenizer.ggml.merges")) == len(
        json.loads((model / "tokenizer.json").read_text())["model"]["merges"])
    if kind == "gemma3_text":
        assert field(reader, "tokenizer.ggml.add_bos_token") is True
        assert field(reader, "gemma3.rope.freq_base_swa") == 10000.0
        assert field(reader, "gemma3.attention.sliding_window_pattern") == 2

    got, kinds = tensors(reader), types(reader)
    weights = load_file(str(fused / "model.safetensors"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm",
             "post_attention_layernorm": "post_attention_norm" if kind == "gemma3_text" else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(2):
        for hf, gg in layer.items():
            for suffix in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{suffix}"] = f"blk.{i}.{gg}.{suffix}"
    assert set(got) == {names[n] for n in weights}, "every fused tensor, nothing else"
    assert ("output.weight" in got) == (kind == "qwen2")  # llama, mistral and gemma3 here tie the head
    if kind == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(got)

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, w in weights.items():
        target = names[name]
        expected = w.astype(np.float32)
        role = target.split(".")[-2]
        if kind in ("llama", "mistral") and role in heads:
            expected = llama_cpp_rows(expected, heads[role])
        if kind == "gemma3_text" and name.endswith("norm.weight"):
            expected = 1.0 + expected
        if w.ndim == 1:
            assert kinds[target] == "F32"
            np.testing.assert_array_equal(got[target], expected.astype(np.float32), err_msg=target)
        else:
            assert kinds[target] == "F16"
            np.testing.assert_array_equal(got[target], expected.astype(np.float16), err_msg=target)


def test_q8_0_tensors(arch, exports):
    _, _, _, fused = arch
    reader = gguf_file(exports["q8_0"].out / "model-q8_0.gguf")
    assert field(reader, "general.file_type") == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    kinds = types(reader)
    assert {k for n, k in kinds.items() if n.endswith("norm.weight") or n.endswith(".bias")} == {"F32"}
    assert {k for n, k in kinds.items() if n.endswith(("attn_q.weight", "ffn_down.weight"))} == {"Q8_0"}
    # Q8_0 by hand, as ggml's quantize_row_q8_0_ref: blocks of 32, d = max|w| / 127,
    # q = round(w * (1/d)) in float32, stored d rounded to f16.
    w = load_file(str(fused / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(1, keepdims=True) / np.float32(127)
    q = np.round(blocks * (np.float32(1) / d))
    naive = (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)
    np.testing.assert_allclose(tensors(reader)["blk.1.ffn_down.weight"], naive, atol=1e-6)


def test_readback_check_is_reported(arch, exports):
    f16, q8 = exports["f16"], exports["q8_0"]
    assert f16.max_logit_diff < 0.05 and f16.top1_agreement > 0.9  # f16 rounding only (random
    # tiny models have near-ties at some positions)
    assert f16.max_logit_diff < q8.max_logit_diff < 1.0
    assert not f16.base_quantized
    readme = (f16.out / "README.md").read_text()
    assert "llama-server -m model-f16.gguf" in readme and "Read-back check" in readme


def test_lora_layout(arch, exports):
    kind, model, adapter, _ = arch
    config = json.loads((model / "config.json").read_text())
    reader = gguf_file(exports["lora"].out / "adapter.gguf")
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 8.0  # make_adapter's alpha (scale 2 x rank 4)
    assert field(reader, "general.architecture") == {"gemma3_text": "gemma3", "mistral": "llama"}.get(kind, kind)
    got = tensors(reader)
    mine = load_file(str(adapter / "adapters.safetensors"))
    assert len(got) == len(mine) == 2 * 2 * len(TARGETS)
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "down_proj": "ffn_down"}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, w in mine.items():
        path, leaf = name.rsplit(".", 1)
        layer, module = path.split(".")[2], path.rsplit(".", 1)[1]
        target = f"blk.{layer}.{short[module]}.weight.{leaf}"
        if leaf == "lora_a":
            np.testing.assert_array_equal(got[target], w.T)  # (r, in), PEFT's lora_A
        else:
            expected = w.T  # (out, r): rows are the weight's output rows
            if kind in ("llama", "mistral") and short[module] in heads:
                expected = llama_cpp_rows(expected, heads[short[module]])
            np.testing.assert_array_equal(got[target], expected)


def test_round_trip_through_model_import(arch, exports, tmp_path):
    """`toss-mlx model import` of the exported GGUF gives back the fused model's logits
    (every architecture: export applies the inverse of each import transform)."""
    from toss_mlx.models.gguf import import_gguf

    kind, model, adapter, _ = arch
    reference, tokenizer = load_model(str(model), adapter_path=str(adapter), quiet=True)
    tokens = tokenizer.encode(CHECK_TEXT)[:32]  # the export's own check prompt
    expected = mlx_logits(reference, tokens)
    base, _ = load_model(str(model), quiet=True)
    assert np.abs(expected - mlx_logits(base, tokens)).max() > 0.5, "the adapter must visibly change the logits"
    for quant, tol in (("f16", 0.05), ("q8_0", 1.0)):
        imported = import_gguf(exports[quant].out / f"model-{quant}.gguf", tmp_path / quant)
        got = mlx_logits(load_model(str(imported), quiet=True)[0], tokens)
        diff = np.abs(got - expected).max()
        assert diff < tol, (quant, diff)
        # The export's own read-back measured the same number through another decoder.
        assert abs(diff - exports[quant].max_logit_diff) < 2e-3


def test_ollama_folder(arch, tmp_path):
    kind, model, adapter, _ = arch
    result = export_adapter(adapter, tmp_path / "ollama", fmt="ollama", model=str(model),
                            system_prompt="You are careful.")
    files = sorted(p.name for p in (tmp_path / "ollama").iterdir())
    assert files == ["Modelfile", "README.md", "model-f16.gguf"]
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("FROM ./model-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are careful."""' in text
    assert "TEMPLATE" in text and '{{ "<|im_start|>user\\n" }}' in text
    if kind == "gemma3_text":  # the system text opens the first user turn
        assert '{{ if ne $prev "system" }}' in text and "model\\n" in text
    readme = (tmp_path / "ollama" / "README.md").read_text()
    name = "model-toss"
    assert f"ollama create {name} -f Modelfile" in readme
    assert result.files["model-f16.gguf"] > 0


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_chat_segments_reproduce_the_jinja_template(kind, tmp_path):
    """The Modelfile's template pieces give the Jinja template's text on unseen conversations."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(build_arch_folder(tmp_path / kind, kind))
    strip_bos = kind == "gemma3_text"  # its tokenizer config sets add_bos_token
    segs = chat_segments(tokenizer, strip_bos=strip_bos)
    assert segs is not None and segs.system_in_user == (kind == "gemma3_text")
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"},
                    {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"},
                    {"role": "assistant", "content": "e"}, {"role": "user", "content": "f"}]
    for messages, generation in ((conversation, True), (conversation[1:], True),
                                 (conversation[1:5], False)):
        jinja = tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation)
        if strip_bos:
            assert jinja.startswith(tokenizer.bos_token)
            jinja = jinja.removeprefix(tokenizer.bos_token)
        assert render_segments(segs, messages, generation) == jinja


def test_cli_export_gguf(tiny_model_dir, tmp_path):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    model, adapter = tiny_model_dir, make_adapter(tiny_model_dir, tmp_path / "adapter")
    result = CliRunner().invoke(app, ["export", str(adapter), "--format", "gguf", "--quant", "q8_0",
                                      "--model", str(model), "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "model-q8_0.gguf" in result.output and "read-back max |logit difference|" in result.output
    again = CliRunner().invoke(app, ["export", str(adapter), "--format", "gguf", "--model",
                                     str(model), "--out", str(tmp_path / "g")])
    assert again.exit_code == 0, again.output  # an earlier export is replaced
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["README.md", "model-f16.gguf"]
    bad = CliRunner().invoke(app, ["export", str(adapter), "--format", "gguf", "--quant", "q2",
                                   "--model", str(model), "--out", str(tmp_path / "h")])
    assert bad.exit_code == 2 and "unknown --quant 'q2'" in bad.output


def test_refusals_write_nothing(tmp_path, tiny_model_dir, monkeypatch):
    def refused(match, adapter, **kw):
        with pytest.raises(TossError, match=match):
            export_gguf(adapter, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()

    model = str(tiny_model_dir)
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", dora=True)
    refused("DoRA adapter cannot be written as a llama.cpp LoRA", dora, fmt="gguf-lora", model=model)
    lora = make_adapter(tiny_model_dir, tmp_path / "lora")
    for module, match in (("lm_head", "tied to the embeddings"),
                          ("model.embed_tokens", "has no llama.cpp llama LoRA tensor")):
        other = tmp_path / module
        other.mkdir()
        (other / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
        rows = 64 if module == "lm_head" else 400
        save_file({f"{module}.lora_a": np.ones((rows, 4), np.float32),
                   f"{module}.lora_b": np.ones((4, 464 - rows), np.float32)},
                  str(other / "adapters.safetensors"))
        refused(match, other, fmt="gguf-lora", model=model)
    refused("records no base model; pass --model", lora)
    refused("unknown --quant 'q3_k'", lora, model=model, quant="q3_k")

    phi = tmp_path / "phi3"
    phi.mkdir()
    for f in tiny_model_dir.iterdir():
        (phi / f.name).write_bytes(f.read_bytes())
    config = json.loads((phi / "config.json").read_text())
    (phi / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    refused("architecture 'phi3' cannot be exported to GGUF", lora, model=str(phi))
    (phi / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    refused("RoPE scaling", lora, model=str(phi))
    (phi / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 4096}))
    refused("Mistral with a sliding window", lora, model=str(phi))

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    refused("q4_k_m uses llama.cpp's own quantizer", lora, model=model, quant="q4_k_m")

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TossError, match="holds other files"):
        export_gguf(lora, tmp_path / "out", model=model)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_quantized_base_is_said_and_measured(tmp_path, tiny_model_dir):
    from adapters import quantized_copy

    q4 = quantized_copy(tiny_model_dir, tmp_path / "q4", group_size=32, bits=4)
    adapter = make_adapter(q4, tmp_path / "adapter")
    result = export_gguf(adapter, tmp_path / "out", model=str(q4), quant="q8_0")
    assert result.base_quantized and any("requantized to q8_0" in n for n in result.notes)
    assert "requantized to q8_0" in (tmp_path / "out" / "README.md").read_text()
    # The reported difference is the file's against the dequantized 4-bit base plus the adapter:
    # measured again here through `model import` (another Q8_0 decoder).
    from toss_mlx.models.gguf import import_gguf

    reference, tokenizer = load_model(str(q4), adapter_path=str(adapter), quiet=True)
    tokens = tokenizer.encode(CHECK_TEXT)[:32]
    imported = load_model(str(import_gguf(tmp_path / "out" / "model-q8_0.gguf", tmp_path / "imp")),
                          quiet=True)[0]
    diff = np.abs(mlx_logits(imported, tokens) - mlx_logits(reference, tokens)).max()
    assert 0 < result.max_logit_diff < 1.0 and abs(diff - result.max_logit_diff) < 2e-3


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
                    reason="needs torch + transformers (pip install torch==2.13.0 transformers)")
def test_transformers_gguf_loader_reads_the_fused_model(arch, exports):
    """transformers' own GGUF reader (its own dequantizer, q/k un-permutation and Gemma norm shift)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, model, adapter, _ = arch
    reference, _ = load_model(str(model), adapter_path=str(adapter), quiet=True)
    # transformers maps no query_pre_attn_scalar or sliding-window pattern from a gemma3 GGUF
    # (it would attend with its defaults 256 and all-sliding): give it the true config, so the
    # weights are what it checks here; llama.cpp checks the metadata (test_export_llama_cpp.py).
    config = AutoConfig.from_pretrained(str(model)) if kind == "gemma3_text" else None
    hf = AutoModelForCausalLM.from_pretrained(str(exports["f16"].out), gguf_file="model-f16.gguf",
                                              config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, mlx_logits(reference), atol=0.03)  # f16 weights


@pytest.mark.slow
def test_smollm2_ollama_export_and_round_trip(smollm2_dir, tmp_path):
    """SmolLM2-135M + LoRA: the Ollama folder's template, and `model import` gives the logits back."""
    from toss_mlx.models.gguf import import_gguf

    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", num_layers=8, rank=8, alpha=16.0,
                           targets=("q_proj", "k_proj", "v_proj", "down_proj"), amplitude=0.05)
    result = export_adapter(adapter, tmp_path / "ollama", fmt="ollama", model=str(smollm2_dir))
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    # SmolLM2's BOS is <|im_start|>, and it is not added by the tokenizer: it stays in the turns.
    assert '{{ "<|im_start|>system\\n" }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert result.max_logit_diff < 0.1

    reference, tokenizer = load_model(str(smollm2_dir), adapter_path=str(adapter), quiet=True)
    tokens = tokenizer.encode(CHECK_TEXT)[:32]
    imported = import_gguf(tmp_path / "ollama" / "model-f16.gguf", tmp_path / "imported")
    got = mlx_logits(load_model(str(imported), quiet=True)[0], tokens)
    expected = mlx_logits(reference, tokens)
    assert np.abs(expected - mlx_logits(load_model(str(smollm2_dir), quiet=True)[0], tokens)).max() > 0.5
    diff = np.abs(got - expected).max()
    assert diff < 0.1 and abs(diff - result.max_logit_diff) < 2e-3


def test_recipe_export_takes_one_format_or_a_list():
    from pathlib import Path

    from toss_mlx.pipeline import load_recipe

    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    assert load_recipe(recipe)[0].export == ["peft"]  # `export: peft`
    assert load_recipe(recipe, ["export=peft,gguf"])[0].export == ["peft", "gguf"]
    with pytest.raises(TossError, match=r"export\[1\]: expected one of .*'ollama'.*got 'onnx'"):
        load_recipe(recipe, ["export=peft,onnx"])


def test_sentencepiece_tokenizer_metadata(tmp_path):
    """A Gemma-style (SentencePiece BPE, byte fallback) tokenizer is written as llama.cpp's "llama" model."""
    model = build_arch_folder(tmp_path / "model", "gemma3_text", spm=True)
    adapter = make_adapter(model, tmp_path / "adapter")
    export_gguf(adapter, tmp_path / "out", model=str(model))
    reader = gguf_file(tmp_path / "out" / "model-f16.gguf")
    data = json.loads((model / "tokenizer.json").read_text())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.bos_token_id") == 2
    tokens = field(reader, "tokenizer.ggml.tokens")
    kinds = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert tokens[:5] == ["<pad>", "<eos>", "<bos>", "<unk>", "<0x00>"]
    assert kinds[:5] == [3, 3, 3, 3, 6] and kinds[4 + 0x41] == 6  # control x4, then BYTE pieces
    # A merged piece scores minus the rank of the first merge that makes it (found by a scan).
    for piece in ("\u2581capital", "\u2581France", "\u2581of"):
        rank = next(r for r, m in enumerate(merges) if "".join(m if isinstance(m, list) else m.split(" ")) == piece)
        assert scores[vocab[piece]] == -float(rank) and kinds[vocab[piece]] == 1


def test_unknown_pre_tokenizer_is_refused_before_loading(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    data = json.loads((model / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(data))
    (model / "model.safetensors").write_bytes(b"not loaded: the refusal comes first")
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(TossError, match="pre-tokenizer .*Whitespace.* matches none llama.cpp"):
        export_gguf(adapter, tmp_path / "out", model=str(model))
    assert not (tmp_path / "out").exists()


def test_multimodal_gemma3_exports_its_text_model(tmp_path):
    """mlx-lm's multimodal Gemma 3 (text model under language_model) gives the text model's GGUF."""
    from mlx_lm.utils import load

    from toss_mlx.export_gguf import write_model_gguf

    text = build_arch_folder(tmp_path / "text", "gemma3_text")
    wrapped = build_arch_folder(tmp_path / "wrapped", "gemma3")  # same seed: the same weights
    for folder in (text, wrapped):
        model, _, config = load(str(folder), return_config=True)
        write_model_gguf(tmp_path / f"{folder.name}.gguf", model, config, folder, "f16", "x", "test")
    a, b = gguf_file(tmp_path / "text.gguf"), gguf_file(tmp_path / "wrapped.gguf")
    assert field(b, "general.architecture") == "gemma3"
    for key in ("gemma3.block_count", "gemma3.attention.key_length", "gemma3.rope.freq_base_swa",
                "gemma3.attention.sliding_window_pattern", "tokenizer.ggml.add_bos_token"):
        assert field(a, key) == field(b, key), key
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)

    adapter = make_adapter(wrapped, tmp_path / "adapter", targets=("q_proj", "down_proj"))
    assert all(k.startswith("language_model.") for k in load_file(str(adapter / "adapters.safetensors")))
    export_gguf(adapter, tmp_path / "lora", fmt="gguf-lora", model=str(wrapped))
    names = set(tensors(gguf_file(tmp_path / "lora" / "adapter.gguf")))
    assert names == {f"blk.{i}.{t}.weight.lora_{ab}" for i in (0, 1) for t in ("attn_q", "ffn_down")
                     for ab in "ab"}
