"""Import a llama-architecture GGUF file (llama.cpp's format) as an mlx-lm model folder.

`mx.load` reads the file: metadata, float tensors, and Q4_0 / Q4_1 / Q8_0 tensors
as MLX (weight, scales, biases) triples with group size 32, which we dequantize
in float32. Four things it does not do for us:

- It converts every other tensor type (K-quants, BF16, ...) to float16 without
  saying so, so we read the tensor table from the header ourselves and refuse
  types we do not support.
- MLX before 0.32.0 decodes Q4_1 blocks wrongly (ml-explore/mlx#3664: it skips a
  2-byte header where Q4_1 has 4), silently giving garbage weights.
- llama.cpp permutes the rows of attn_q and attn_k from Hugging Face's
  rotate-half RoPE layout to an interleaved one; we apply the inverse so the
  folder is a standard HF/mlx-lm llama (PEFT adapters and mlx-lm's RoPE agree).
  Permuting once more instead of undoing it still runs, but gives garbage
  (SmolLM2's perplexity on plain English: 94 instead of 6.1).
- A GGUF has no tokenizer.json: we rebuild it with `tokenizers` from the
  `tokenizer.ggml.*` fields (byte-level BPE, with the pre-tokenizer llama.cpp
  names in `tokenizer.ggml.pre`).

The folder is built next to its destination and renamed into place, so an
import killed at any moment never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..io import TossError, atomic_dir

IMPORT_DTYPES = ("float32", "bfloat16", "q4")
Q4_GROUP_SIZE, Q4_BITS = 64, 4  # the "q4" folder: mlx-lm's default 4-bit quantization

# ggml tensor type ids (ggml.h); the names make error messages readable.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
              24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 30: "BF16"}
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # mx.load gives these as MLX triples, group size 32
GGML_BLOCK = 32

# GGUF tensor names -> mlx-lm llama parameter names (".weight" / ".bias" follow).
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp).
GPT2_REGEX_PRE = ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais")
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4  # tokenizer.ggml.token_type values


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                dtype: str = "float32", progress: bool = False) -> Path:
    """Convert a llama GGUF into an mlx-lm folder (config.json, model.safetensors, tokenizer files).

    dtype: "float32" or "bfloat16" weights, or "q4" for an MLX 4-bit (group 64)
    model for GPU users. An existing `out_dir` is replaced only if it is a model
    folder (holds config.json) or empty.
    """
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model

    if dtype not in IMPORT_DTYPES:
        raise TossError(f"unknown dtype {dtype!r} (expected one of {', '.join(IMPORT_DTYPES)})")
    path, out = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise TossError(f"{path}: GGUF file not found")

    # Entered first, so a folder we may not replace is refused before any work is done.
    with atomic_dir(out, replaceable=lambda p: (p / "config.json").exists()) as tmp:
        types = read_tensor_types(path)
        check_tensor_types(path, types)
        try:
            weights, meta = mx.load(str(path), return_metadata=True)
        except (RuntimeError, ValueError) as e:
            raise TossError(f"{path}: could not read the GGUF file ({e})") from None
        config = llama_config(path, meta, weights, types)
        tokenizer, tokenizer_config = build_tokenizer(path, meta)

        # "q4" quantizes from bfloat16: its rounding is far below the 4-bit error, at half the memory.
        float_dtype = mx.float32 if dtype == "float32" else mx.bfloat16
        params = convert_weights(path, weights, types, config, float_dtype, progress)
        model = llama.Model(llama.ModelArgs.from_dict(config))
        try:
            model.load_weights(list(params.items()), strict=True)
        except ValueError as e:
            raise TossError(f"{path}: tensors do not form a llama model ({e})") from None
        del params
        if dtype == "q4":
            with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints a note; stdout is for results
                model, config = quantize_model(model, config, group_size=Q4_GROUP_SIZE, bits=Q4_BITS)

        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        tokenizer.save(str(tmp / "tokenizer.json"))
        # Plain writes: the whole folder appears atomically.
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------- the tensor table

def read_tensor_types(path: Path) -> dict[str, str]:
    """Name -> ggml type name ("Q4_1", "F32", ...) of every tensor, read from the file's header."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_tensor_table(buf)
    except (struct.error, ValueError, OSError, UnicodeDecodeError) as e:
        raise TossError(f"{path}: not a readable GGUF file ({e})") from None


# Byte widths of GGUF's fixed-size metadata value types; 8 is a string and 9 an array.
_VALUE_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _parse_tensor_table(buf: mmap.mmap) -> dict[str, str]:
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return values

    def read_string() -> str:
        nonlocal pos
        length = take("<Q")[0]  # not `pos += take(...)`: that would read pos before take moves it
        pos += length
        return bytes(buf[pos - length:pos]).decode("utf-8")

    def skip_value(kind: int) -> None:
        nonlocal pos
        if kind == _STRING:
            read_string()
        elif kind == _ARRAY:
            item_kind, count = take("<IQ")
            if item_kind == _STRING:
                for _ in range(count):
                    read_string()
            elif item_kind in _VALUE_WIDTHS:
                pos += count * _VALUE_WIDTHS[item_kind]
            else:
                raise ValueError(f"unsupported metadata array type {item_kind}")
        elif kind in _VALUE_WIDTHS:
            pos += _VALUE_WIDTHS[kind]
        else:
            raise ValueError(f"unknown metadata value type {kind}")

    magic, version = take("<4sI")
    if magic != b"GGUF":
        raise ValueError("it does not start with the GGUF magic bytes")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_values = take("<QQ")
    for _ in range(n_values):
        read_string()  # the key
        skip_value(take("<I")[0])
    types = {}
    for _ in range(n_tensors):
        name = read_string()
        n_dims = take("<I")[0]
        take(f"<{n_dims}Q")  # shape
        kind, _offset = take("<IQ")
        types[name] = GGML_TYPES.get(kind, f"type {kind}")
    return types


def check_tensor_types(path: Path, types: dict[str, str]) -> None:
    unsupported = sorted({t for t in types.values() if t not in SUPPORTED_TYPES})
    if unsupported:
        raise TossError(f"{path}: tensor types {', '.join(unsupported)} are not supported "
                        f"(supported: {', '.join(SUPPORTED_TYPES)}); pick a GGUF quantized with one of those")
    if "Q4_1" in types.values() and _version(mx.__version__) < (0, 32, 0):
        raise TossError(f"{path}: holds Q4_1 tensors, which mlx {mx.__version__} decodes wrongly "
                        "(ml-explore/mlx#3664); upgrade: pip install -U 'mlx>=0.32'")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# ---------------------------------------------------------------------------- config.json

def _value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (mx.load gives numbers as 0-d arrays)."""
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        value = value.tolist()
    if isinstance(value, float):
        value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
    return value


def llama_config(path: Path, meta: dict[str, Any], weights: dict[str, mx.array],
                 types: dict[str, str]) -> dict[str, Any]:
    """The mlx-lm / Hugging Face config.json of the model the metadata describes."""
    arch = _value(meta, "general.architecture")
    if arch != "llama":
        raise TossError(f"{path}: architecture {arch!r} is not supported (only 'llama' GGUFs are)")
    if _value(meta, "llama.expert_count", 0):
        raise TossError(f"{path}: a mixture-of-experts llama (Mixtral-style) is not supported")
    if "rope_freqs.weight" in types:
        raise TossError(f"{path}: Llama-3.1-style RoPE scaling (rope_freqs) is not supported")

    def need(key: str) -> Any:
        value = _value(meta, f"llama.{key}")
        if value is None:
            raise TossError(f"{path}: metadata key llama.{key} is missing")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = _value(meta, "llama.attention.key_length", hidden // heads)
    rotary_dim = _value(meta, "llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise TossError(f"{path}: partial RoPE ({rotary_dim} of {head_dim} dims) is not supported")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _value(meta, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": _value(meta, "llama.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(path, meta),
        "max_position_embeddings": _value(meta, "llama.context_length", 2048),
        "vocab_size": weights["token_embd.weight"].shape[0] if "token_embd.weight" in weights else None,
        "tie_word_embeddings": "output.weight" not in types,
        "attention_bias": "blk.0.attn_q.bias" in types,
        "mlp_bias": "blk.0.ffn_gate.bias" in types,
        "bos_token_id": _value(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(meta, "tokenizer.ggml.eos_token_id"),
    }
    if config["vocab_size"] is None:
        raise TossError(f"{path}: no token_embd.weight tensor")
    return config


def _rope_scaling(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = _value(meta, "llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": _value(meta, "llama.rope.scaling.factor")}
    raise TossError(f"{path}: RoPE scaling {kind!r} is not supported (none and linear are)")


# ---------------------------------------------------------------------------- weights

def mlx_name(gguf_name: str) -> str | None:
    """The mlx-lm parameter name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in LAYER_TENSORS:
        return f"model.layers.{m[1]}.{LAYER_TENSORS[m[2]]}.{suffix}"
    return None


def unpermute_rows(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's permutation of q/k rows (HF rotate-half halves -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(path: Path, weights: dict[str, mx.array], types: dict[str, str],
                    config: dict[str, Any], dtype: mx.Dtype, progress: bool = False) -> dict[str, mx.array]:
    """mlx-lm parameters from the loaded GGUF tensors: dequantized, renamed, q/k rows restored.

    Consumes `weights` tensor by tensor, so peak memory stays near the output size.
    """
    unknown = sorted(name for name in types if mlx_name(name) is None)
    if unknown:
        raise TossError(f"{path}: tensors {', '.join(unknown[:5])} are not part of a plain llama model")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    params = {}
    for name, kind in _with_progress(types.items(), "converting tensors", progress):
        w = weights.pop(name)
        if kind in QUANT_BITS:
            prefix = name.removesuffix(".weight")
            # float32 scales make dequantize compute and return float32 (float16 would round).
            scales = weights.pop(f"{prefix}.scales").astype(mx.float32)
            biases = weights.pop(f"{prefix}.biases").astype(mx.float32)
            w = mx.dequantize(w, scales, biases, group_size=GGML_BLOCK, bits=QUANT_BITS[kind])
        role = name.split(".")[-2]
        if role in heads:
            w = unpermute_rows(w, heads[role])
        params[mlx_name(name)] = w.astype(dtype)
        mx.eval(params[mlx_name(name)])
    return params


def _with_progress(items, description: str, show: bool):
    """A rich progress bar on stderr when it is a terminal; plain iteration otherwise."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    if not (show and console.is_terminal):
        yield from items
        return
    yield from track(list(items), description=description, console=console, transient=True)


# ---------------------------------------------------------------------------- tokenizer

def build_tokenizer(path: Path, meta: dict[str, Any]):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) rebuilt from `tokenizer.ggml.*` metadata."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = _value(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TossError(f"{path}: tokenizer model {kind!r} is not supported "
                        "(only byte-level BPE, tokenizer.ggml.model = 'gpt2')")
    missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if k not in meta]
    if missing:
        raise TossError(f"{path}: metadata {', '.join(missing)} missing: the file holds no usable tokenizer")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TossError(f"{path}: the vocabulary holds duplicate tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    pre = _value(meta, "tokenizer.ggml.pre", "gpt-2")

    # Llama 3's tokenizer (like tiktoken) takes a whole pre-token found in the vocabulary as is.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRE))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GPT2_REGEX_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in DIGITS_THEN_GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        known = ", ".join(GPT2_REGEX_PRE + DIGITS_THEN_GPT2_PRE + LLAMA3_PRE)
        raise TossError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {known})")
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_end|>) and user-defined ones are matched whole, never split by BPE.
    token_types = _value(meta, "tokenizer.ggml.token_type") or [0] * len(tokens)
    if len(token_types) != len(tokens):
        raise TossError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    kinds = list(zip(tokens, token_types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL_TOKEN])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED_TOKEN])

    def token(key: str) -> str | None:
        i = _value(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_value(meta, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_value(meta, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    steps = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        special = {t for t, used in ((bos, add_bos), (eos, add_eos)) if used}
        steps.append(processors.TemplateProcessing(single=single, pair=pair,
                                                   special_tokens=[(t, vocab[t]) for t in special]))
    tok.post_processor = processors.Sequence(steps)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _value(meta, "llama.context_length", 2048),
        "chat_template": _value(meta, "tokenizer.chat_template"),
    }
    return tok, tokenizer_config
