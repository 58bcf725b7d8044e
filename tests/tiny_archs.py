"""Tiny random qwen2 and gemma3 models (mlx-lm classes), next to tiny.py's llama, for the GGUF export tests.

Each folder has the tiny byte-level BPE tokenizer of tiny.py; the gemma3 one
adds a BOS token and a Gemma-style chat template (the system text opens the
first user turn), as Gemma's own tokenizer config does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny import CORPUS, build_model_folder, build_tokenizer

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<|im_start|>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"
)

QWEN2 = {
    "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "eos_token_id": 2,
}
# Two layers with sliding_window_pattern 2: layer 0 is local (RoPE base 10000), layer 1 global (1e6).
GEMMA3 = {
    "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "sliding_window": 512, "sliding_window_pattern": 2, "max_position_embeddings": 512,
    "eos_token_id": 2, "bos_token_id": 0,
}

def build_spm_tokenizer(folder: Path, vocab_size: int = 600) -> int:
    """A SentencePiece-style BPE tokenizer.json as Gemma's: "▁" for spaces, byte fallback
    pieces <0x00>..<0xFF> in the vocabulary, no pre-tokenizer, <pad> <eos> <bos> <unk> first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 4, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    data = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": False, "vocab": vocab, "merges": trained["merges"]},
    }
    Tokenizer.from_str(json.dumps(data)).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": GEMMA_TEMPLATE.replace("<|im_start|>", "<start>").replace("<|im_end|>", "<eos>"),
        "model_max_length": 512}))
    return len(vocab)


def build_arch_folder(folder: Path, model_type: str, seed: int = 0, spm: bool = False) -> Path:
    """A tiny random mlx-lm model folder of `model_type` ("llama", "mistral", "qwen2", "gemma3_text").

    spm: (gemma3_text) a SentencePiece-style tokenizer (build_spm_tokenizer), as Gemma's own.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text, qwen2

    if model_type == "gemma3":  # the multimodal wrapper mlx-lm loads: text model under language_model
        import mlx.core as mx

        build_arch_folder(folder, "gemma3_text", seed=seed, spm=spm)
        text = json.loads((folder / "config.json").read_text())
        weights = mx.load(str(folder / "model.safetensors"))
        mx.save_safetensors(str(folder / "model.safetensors"),
                            {f"language_model.{k}": v for k, v in weights.items()})
        (folder / "config.json").write_text(json.dumps({
            "model_type": "gemma3", "text_config": {k: v for k, v in text.items() if k != "vocab_size"},
            "vocab_size": text["vocab_size"], "eos_token_id": text["eos_token_id"],
            "bos_token_id": text["bos_token_id"]}))
        return folder
    if model_type in ("llama", "mistral"):  # mlx-lm runs mistral with its llama model
        extra = {"model_type": "mistral", "sliding_window": None} if model_type == "mistral" else {}
        return build_model_folder(folder, seed=seed, **extra)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_spm_tokenizer(folder) if spm else build_tokenizer(folder)
    config = dict(QWEN2 if model_type == "qwen2" else GEMMA3, vocab_size=vocab)
    if spm:
        config.update(eos_token_id=1, bos_token_id=2)
    module = qwen2 if model_type == "qwen2" else gemma3_text
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    if model_type == "gemma3_text":
        del params["lm_head.weight"]  # Gemma ties the head to the embeddings
        # Norm weights are stored as w with the model using (1 + w); random values make the
        # GGUF's 1 + w visible (a zero init would pass with or without the shift).
        for name in params:
            if name.endswith("norm.weight"):
                params[name] = 0.5 * mx.random.normal(params[name].shape)
        if not spm:
            tok_config = json.loads((folder / "tokenizer_config.json").read_text())
            tok_config.update(bos_token="<|endoftext|>", add_bos_token=True, chat_template=GEMMA_TEMPLATE)
            (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(config))
    return folder

