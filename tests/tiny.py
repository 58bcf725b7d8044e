"""A tiny random llama model and a tiny byte-level BPE tokenizer, built in-process for tests.

Saved as an mlx-lm model folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a ChatML template), so every code path that loads a
real model can load it: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Human: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "I'm sorry, but I cannot help with that request. As an AI, I can't assist.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Sure, here is how to bake bread: mix flour, water, salt and yeast, then knead and bake.",
    "The quick brown fox jumps over the lazy dog. Hello world! Tokens, numbers 0123456789.",
    "system user assistant You are a helpful assistant. Explain, answer, refuse, comply.",
]

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": None,  # set from the tokenizer
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
    "eos_token_id": 2,
    "bos_token_id": None,
}


def build_tokenizer(folder: Path, vocab_size: int = 400) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML,
        "model_max_length": 512,
    }))
    return tok.get_vocab_size()


def build_model_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    import toss_mlx  # noqa: F401  (BLAS before mlx)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    config = dict(CONFIG, vocab_size=vocab, **overrides)
    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict(config)
    model = llama.Model(args)
    # mlx's default init, saved as is (tests that need clearly different logits per input
    # rescale these weights themselves, e.g. test_evaluate's noisy_dir).
    params = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
