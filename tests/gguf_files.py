"""Tiny GGUF files written with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py does.

Each architecture's model is built with its mlx-lm class and random weights (Hugging
Face layout), then written as GGUF with llama.cpp's transforms applied: llama's q/k
rows permuted to the interleaved RoPE layout, Gemma's norms stored as 1 + w. The
GGUF names are spelled out here, independently of the importer (which takes them
from gguf's tensor name map). `write_gguf` returns the weights the file really holds,
decoded by gguf.quants.dequantize, so a test can load them into the mlx-lm class
directly and compare logits with the imported folder.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tiny import CHATML

Q = gguf.GGMLQuantizationType

CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": False},
    # head_dim 32 is not hidden / heads = 16: the key_length field must be read.
    "qwen3": {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": True},
    # 6 layers: layers 0-4 use the sliding window (8 tokens) and base 10000, layer 5 is global.
    "gemma3": {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-6,
               "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 32,
               "sliding_window": 8, "sliding_window_pattern": 6, "max_position_embeddings": 512},
    "phi3": {"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "max_position_embeddings": 512, "original_max_position_embeddings": 512,
             "tie_word_embeddings": False},
}

TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GEMMA_LAYER_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                     "post_feedforward_layernorm": "post_ffw_norm"}
# Byte offsets of the float16 scales in one K-quant (or IQ4_NL) block (ggml-common.h), set to sane values
# so random blocks decode to finite weights (gguf-py cannot quantize to K-quants or IQ4_NL).
RANDOM_BLOCK_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
                       Q.IQ4_NL: (0,)}


def gguf_name(arch: str, name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    _, _, layer, module = stem.split(".", 3)
    table = {**LAYER_NAMES, **GEMMA_LAYER_NAMES} if arch == "gemma3" else LAYER_NAMES
    return f"blk.{layer}.{table[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_model(arch: str, vocab_size: int, seed: int = 0, **overrides):
    """(mlx-lm model, config, HF-named numpy weights): random, with sharp attention and norms near 1."""
    config = dict(CONFIGS[arch], vocab_size=vocab_size, **overrides)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if "norm" in name:  # gemma computes with 1 + w, the others with w
            w = rng.normal(0, 0.1, p.shape) + (0 if arch == "gemma3" else 1)
        else:
            w = rng.normal(0, 0.02 if name.endswith(".bias") else 0.2, p.shape)
            if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")):
                w = w * 3  # attention far from uniform, so a wrong q/k row order shows in the logits
        weights[name] = w.astype(np.float32)
    return model, config, weights


def encode(w: np.ndarray, kind: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or float array as the file stores it, the values those decode to)."""
    if kind == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if kind == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if kind in RANDOM_BLOCK_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for at in RANDOM_BLOCK_SCALES[kind]:
            scale = rng.uniform(0.002, 0.01, raw.shape[:2]).astype(np.float16)
            raw[..., at:at + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
        raw = raw.reshape(w.shape[0], -1)
    else:
        raw = gguf.quants.quantize(w.astype(np.float32), kind)
    return raw, gguf.quants.dequantize(raw, kind).astype(np.float32)


def tokenizer_metadata(folder: Path, pre: str = "smollm") -> dict:
    """The tiny byte-level BPE tokenizer as `tokenizer.ggml.*` fields (SmolLM2-style: bos set, not added)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    specials = {t["content"] for t in tok["added_tokens"]}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) for m in tok["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


def add_metadata(writer: gguf.GGUFWriter, meta: dict) -> None:
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value and isinstance(value[0], float):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
        elif value and isinstance(value[0], int):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            writer.add_array(key, value)


def arch_metadata(arch: str, config: dict) -> dict:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    meta = {
        "general.name": f"tiny-{arch}",
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{arch}.rope.freq_base": config["rope_theta"],
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
    }
    if arch == "gemma3":
        meta["gemma3.attention.sliding_window"] = config["sliding_window"]
    return meta


def write_gguf(path: Path, arch: str, config: dict, weights: dict[str, np.ndarray], tokenizer_meta: dict,
               types: dict[str, Q] | None = None, meta: dict | None = None, permute: bool = True,
               seed: int = 0) -> dict[str, mx.array]:
    """Write the model as llama.cpp would; return what the file holds, as HF-named float32 weights.

    types: GGUF tensor name -> ggml type (default F32). meta overrides metadata (None deletes a key).
    """
    types = types or {}
    rng = np.random.default_rng(seed)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    fields = {**arch_metadata(arch, config), **tokenizer_meta, **(meta or {})}
    writer = gguf.GGUFWriter(str(path), fields.pop("general.architecture", arch))
    add_metadata(writer, fields)
    expected = {}
    for name, w in weights.items():
        g = gguf_name(arch, name)
        if arch == "gemma3" and g.endswith("norm.weight"):
            w = (w + 1).astype(np.float32)  # llama.cpp stores Gemma's norms as 1 + w
        raw, held = encode(w, types.get(g, Q.F32), rng)
        role = g.split(".")[-2]
        if arch == "llama" and permute and role in heads:
            # Blocks run along rows, so permuting the stored rows permutes the decoded rows.
            raw = llama_cpp_permute(raw, heads[role])
        if arch == "gemma3" and g.endswith("norm.weight"):
            held = held - 1
        expected[name] = mx.array(held)
        kind = types.get(g, Q.F32)
        writer.add_tensor(g, raw, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def reference_logits(config: dict, weights: dict[str, mx.array], ids: list[int]) -> np.ndarray:
    """The mlx-lm model of `config` with `weights` loaded directly, float32 logits."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(weights)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    return np.array(model(mx.array(ids)[None])[0])
