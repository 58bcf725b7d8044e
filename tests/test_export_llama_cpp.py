"""The GGUF exports run in llama.cpp itself (llama-cpp-python), with the MLX model's logits and text.

Skipped when llama-cpp-python is not installed: it has no binary wheel on PyPI
for Linux x86-64 and builds llama.cpp from source (scripts/install.sh --test
does that; about 10 minutes on 2 cores).

Tolerances: llama.cpp's CPU matmul rounds the activations to f16 for f16
weights (and to 8 bits for q8_0 / K-quant weights), on top of the weights'
own rounding, so logits are compared within a fraction of their spread rather
than to float32 precision; greedy text must match token for token.
"""

import importlib.util

import numpy as np
import pytest
from adapters import make_adapter, mlx_logits
from tiny_archs import build_arch_folder

from toss_mlx.export_gguf import CHECK_TEXT, check_prompt, export_gguf, write_model_gguf
from toss_mlx.models.load import load_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="needs llama-cpp-python (a source build of llama.cpp: "
           "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python)")

# gemma3_spm: a Gemma-style SentencePiece tokenizer; gemma3: mlx-lm's multimodal wrapper (text exported)
ARCHS = ["llama", "mistral", "qwen2", "gemma3_text", "gemma3_spm", "gemma3"]
TEXT = CHECK_TEXT + " Caf\u00e9 \u00a35, 3..3  spaces\n\nnew lines"  # byte fallback, runs of spaces
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
STEPS = 20


def llama(path, lora=None):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=256,
                 logits_all=True, verbose=False, n_threads=2, seed=0)


def cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def cpp_greedy(llm, tokens: list[int], steps: int = STEPS) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def mlx_greedy(model, tokens: list[int], steps: int = STEPS) -> list[int]:
    out = []
    for _ in range(steps):
        out.append(int(mlx_logits(model, tokens + out)[-1].argmax()))
    return out


def assert_close_logits(got: np.ndarray, expected: np.ndarray, share: float) -> float:
    """Max |difference| within `share` of the logits' spread (their std over the vocabulary)."""
    diff = float(np.abs(got - expected).max())
    spread = float(expected.std())
    assert diff < share * spread, f"max |logit difference| {diff:.4f} vs spread {spread:.3f}"
    return diff


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"cpp-{kind}")
    model = build_arch_folder(root / "model", kind.replace("_spm", "_text"), spm=kind.endswith("_spm"))
    adapter = make_adapter(model, root / "adapter", targets=TARGETS, rank=4, alpha=8.0)
    reference, tokenizer = load_model(str(model), adapter_path=str(adapter), quiet=True)
    return kind, model, adapter, reference, tokenizer, root


def test_fused_gguf_in_llama_cpp(case):
    kind, model, adapter, reference, tokenizer, root = case
    result = export_gguf(adapter, root / "f16", model=str(model))
    llm = llama(root / "f16" / "model-f16.gguf")
    # The GGUF's tokenizer splits text as the model's own does.
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == \
        tokenizer.encode(TEXT, add_special_tokens=False)
    tokens = llm.tokenize(CHECK_TEXT.encode(), add_bos=False, special=True)
    expected = mlx_logits(reference, tokens)
    base = mlx_logits(load_model(str(model), quiet=True)[0], tokens)
    assert np.abs(expected - base).max() > 0.5, "the adapter must visibly change the logits"
    diff = assert_close_logits(cpp_logits(llm, tokens), expected, 0.05)
    print(f"{kind} f16: llama.cpp max |logit difference| {diff:.4f}, spread {expected.std():.3f}")
    # Greedy text, 20 tokens, token for token and as text.
    want = mlx_greedy(reference, tokens)
    got = cpp_greedy(llm, tokens)
    assert got == want
    assert llm.detokenize(got, special=True).decode("utf-8", errors="replace") == tokenizer.decode(want)
    assert result.max_logit_diff is not None


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_gguf_in_llama_cpp(case, quant):
    """llama.cpp runs the quantized file as the export's own read-back check predicted."""
    kind, model, adapter, reference, tokenizer, root = case
    result = export_gguf(adapter, root / quant, model=str(model), quant=quant)
    llm = llama(root / quant / f"model-{quant}.gguf")
    tokens = check_prompt(tokenizer)  # the prompt of the export's read-back check
    expected = mlx_logits(reference, tokens)
    got = cpp_logits(llm, tokens)
    diff, spread = float(np.abs(got - expected).max()), float(expected.std())
    print(f"{kind} {quant}: llama.cpp {diff:.4f}, read-back {result.max_logit_diff:.4f}, spread {spread:.3f}")
    # llama.cpp runs what the file holds: its error is the one the read-back check (the file's
    # weights, dequantized, in MLX) measured, plus its own 8-bit rounding of the activations.
    assert diff < result.max_logit_diff + 0.1 * spread
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.5
    if quant == "q4_k_m":
        import gguf

        kinds = [t.tensor_type.name for t in gguf.GGUFReader(str(root / quant / "model-q4_k_m.gguf")).tensors]
        assert {k: kinds.count(k) for k in set(kinds)} == result.tensor_types
        # The tiny models' rows (64 or 128 values) are too short for K-quants: llama.cpp falls back.
        assert set(kinds) <= {"F32", "Q5_0", "Q8_0"} and any("fallback" in n for n in result.notes)


def test_base_gguf_plus_lora_gguf_in_llama_cpp(case):
    """llama.cpp applies the gguf-lora adapter to the base GGUF as MLX applies the adapter."""
    from mlx_lm.utils import load

    kind, model, adapter, reference, tokenizer, root = case
    base_model, _, config = load(str(model), return_config=True)
    write_model_gguf(root / "base.gguf", base_model, config, model, "f16", "base", str(model))
    export_gguf(adapter, root / "lora", fmt="gguf-lora", model=str(model))
    tokens = tokenizer.encode(CHECK_TEXT, add_special_tokens=False)[:32]
    expected = mlx_logits(reference, tokens)
    plain = cpp_logits(llama(root / "base.gguf"), tokens)
    assert np.abs(plain - expected).max() > 0.5, "without the LoRA llama.cpp must differ"
    llm = llama(root / "base.gguf", lora=root / "lora" / "adapter.gguf")
    diff = assert_close_logits(cpp_logits(llm, tokens), expected, 0.05)
    print(f"{kind} base + LoRA GGUF: llama.cpp max |logit difference| {diff:.4f}")
    assert cpp_greedy(llm, tokens) == mlx_greedy(reference, tokens)


@pytest.mark.slow
def test_smollm2_fused_gguf_in_llama_cpp(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct + a LoRA: llama.cpp's logits and 20 greedy tokens match MLX."""
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", num_layers=8, rank=8, alpha=16.0,
                           targets=("q_proj", "k_proj", "v_proj", "down_proj"), amplitude=0.05)
    reference, tokenizer = load_model(str(smollm2_dir), adapter_path=str(adapter), quiet=True)
    export_gguf(adapter, tmp_path / "f16", model=str(smollm2_dir))
    llm = llama(tmp_path / "f16" / "model-f16.gguf")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    assert llm.tokenize(tokenizer.decode(prompt).encode(), add_bos=False, special=True) == list(prompt)
    expected = mlx_logits(reference, list(prompt))
    base = mlx_logits(load_model(str(smollm2_dir), quiet=True)[0], list(prompt))
    assert np.abs(expected - base).max() > 0.5, "the adapter must visibly change the logits"
    assert_close_logits(cpp_logits(llm, list(prompt)), expected, 0.05)
    want = mlx_greedy(reference, list(prompt))
    got = cpp_greedy(llm, list(prompt))
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
    assert llm.detokenize(got, special=True).decode() == tokenizer.decode(want)

    export_gguf(adapter, tmp_path / "lora", fmt="gguf-lora", model=str(smollm2_dir))
    from mlx_lm.utils import load

    base_model, _, config = load(str(smollm2_dir), return_config=True)
    write_model_gguf(tmp_path / "base.gguf", base_model, config, smollm2_dir, "f16", "base", "smollm2")
    with_lora = llama(tmp_path / "base.gguf", lora=tmp_path / "lora" / "adapter.gguf")
    assert_close_logits(cpp_logits(with_lora, list(prompt)), expected, 0.05)
    assert cpp_greedy(with_lora, list(prompt)) == want


@pytest.mark.slow
def test_smollm2_lora_gguf_on_the_wheels_own_gguf(smollm2_dir, tmp_path):
    """The adapter on the Q4_1 GGUF the registry model was imported from: the weights it was trained on."""
    from toss_mlx.models.registry import source_file

    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", num_layers=8, rank=8, alpha=16.0,
                           targets=("q_proj", "v_proj"), amplitude=0.05)
    reference, tokenizer = load_model(str(smollm2_dir), adapter_path=str(adapter), quiet=True)
    export_gguf(adapter, tmp_path / "lora", fmt="gguf-lora", model=str(smollm2_dir))
    tokens = tokenizer.encode(CHECK_TEXT, add_special_tokens=False)
    llm = llama(source_file("smollm2-135m-instruct"), lora=tmp_path / "lora" / "adapter.gguf")
    # llama.cpp rounds the activations to 8 bits for its Q4_1 dot products: a looser bound.
    assert_close_logits(cpp_logits(llm, tokens), mlx_logits(reference, tokens), 0.25)


def test_q4_k_m_uses_k_quants_where_rows_allow(tmp_path):
    """Rows of 256 values: Q4_K for most weights, Q6_K where llama.cpp's Q4_K_M mix puts more bits."""
    from tiny import build_model_folder

    model = build_model_folder(tmp_path / "model", hidden_size=256, intermediate_size=512)
    adapter = make_adapter(model, tmp_path / "adapter", targets=("q_proj", "v_proj"))
    result = export_gguf(adapter, tmp_path / "q4", model=str(model), quant="q4_k_m")
    types = result.tensor_types
    assert types.get("Q4_K", 0) > 0 and types.get("Q6_K", 0) > 0, types
    assert set(types) <= {"F32", "Q4_K", "Q6_K"} and not result.notes
    reference, tokenizer = load_model(str(model), adapter_path=str(adapter), quiet=True)
    tokens = check_prompt(tokenizer)
    expected = mlx_logits(reference, tokens)
    got = cpp_logits(llama(tmp_path / "q4" / "model-q4_k_m.gguf"), tokens)
    assert np.abs(got - expected).max() < result.max_logit_diff + 0.1 * expected.std()
