"""Import a GGUF file (llama.cpp's format) as an mlx-lm model folder.

Architectures: llama, qwen2, qwen3, gemma3, phi3 (`SUPPORTED_ARCHITECTURES`), each
mapped to its mlx-lm model class. `gguf` (llama.cpp's own numpy package) reads the
header, metadata and tensor table, names the tensors (`gguf.get_tensor_name_map`)
and dequantizes every tensor type it knows, K-quants included. What we add:

- Bounds. GGUFReader trusts the header: an array count of 2**60 loops for ever,
  a string or tensor running past the end of the file is silently cut short.
  `_BoundedReader` checks every count and size against the file's length before
  it reads, so a bad file fails with one clear line.
- Speed. Q8_0, Q4_0, Q4_1 and Q5_0 blocks are decoded with MLX (about 2x faster
  than gguf.quants' numpy on 2 cores; tested equal to gguf.quants.dequantize).
- Undoing llama.cpp's conversion (`convert_hf_to_gguf.py`), per architecture, so the
  folder holds the Hugging Face layout mlx-lm and PEFT expect:
  * llama: attn_q / attn_k rows were permuted from HF's rotate-half RoPE layout to
    interleaved pairs; we apply the inverse (`unpermute_rows`). Permuting once more
    instead still runs but gives garbage (SmolLM2's perplexity 94 instead of 6.1).
  * gemma3: every `*norm.weight` was stored as 1 + w (Gemma's RMSNorm multiplies
    by 1 + w); we subtract 1 (mlx-lm's gemma3_text adds it back). Without this the
    perplexity is about 2.6e7.
  * qwen2, qwen3, phi3: tensors are stored as in HF (no permutation).
- A GGUF has no tokenizer.json: we rebuild it with `tokenizers` from the
  `tokenizer.ggml.*` fields: byte-level BPE ("gpt2", with the pre-tokenizer
  `tokenizer.ggml.pre` names) or SentencePiece BPE ("llama", Gemma's included; merges
  derived from the scores when the file has none, byte fallback, `<bos>` added when
  the file asks).

The folder is built next to its destination and renamed into place, so an
import killed at any moment never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..io import TossError, atomic_dir
from ..progress import track

IMPORT_DTYPES = ("float32", "bfloat16", "q4", "q8")
QUANT_GROUP_SIZE = 64  # "q4" / "q8" folders: mlx-lm's default affine quantization, group 64
QUANT_BITS = {"q4": 4, "q8": 8}

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp).
GPT2_REGEX_PRE = ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais")
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's tokenizer.json: like Llama 3's, but digits one at a time.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, BYTE_TOKEN = 1, 3, 4, 6  # tokenizer.ggml.token_type
SPIECE_SPACE = "\u2581"


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                dtype: str = "float32", progress: bool = False) -> Path:
    """Convert a GGUF into an mlx-lm folder (config.json, model.safetensors, tokenizer files).

    dtype: "float32" or "bfloat16" weights, or "q4" / "q8" for an MLX affine 4- / 8-bit
    (group 64) model for GPU users. An existing `out_dir` is replaced only if it is a
    model folder (holds config.json) or empty.
    """
    from mlx_lm.utils import quantize_model, save_config, save_model

    if dtype not in IMPORT_DTYPES:
        raise TossError(f"unknown dtype {dtype!r} (expected one of {', '.join(IMPORT_DTYPES)})")
    path, out = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise TossError(f"{path}: GGUF file not found")

    # Entered first, so a folder we may not replace is refused before any work is done.
    with atomic_dir(out, replaceable=lambda p: (p / "config.json").exists()) as tmp:
        reader = read_gguf(path)
        meta = metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        config = model_config(path, meta, tensors)
        tokenizer, tokenizer_config = build_tokenizer(path, meta)

        # "q4"/"q8" quantize from bfloat16: its rounding is far below the 4-bit error, at half the memory.
        float_dtype = mx.float32 if dtype == "float32" else mx.bfloat16
        model = build_model(path, config, tensors, float_dtype, progress)
        if dtype in QUANT_BITS:
            with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints a note; stdout is for results
                model, config = quantize_model(model, config, group_size=QUANT_GROUP_SIZE,
                                               bits=QUANT_BITS[dtype])

        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        tokenizer.save(str(tmp / "tokenizer.json"))
        # Plain writes: the whole folder appears atomically.
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------- reading, with bounds

class BadGGUF(ValueError):
    """A structural problem in the file (raised inside the reader, reported as a TossError)."""


def _reader_class():
    import gguf

    # Smallest encoded size of one value of each metadata type: a string is at least its
    # 8-byte length, an array its 4-byte type and 8-byte count.
    widths = {t: np.dtype(n).itemsize for t, n in gguf.GGUFReader.gguf_scalar_to_np.items()}
    widths[gguf.GGUFValueType.STRING] = 8
    widths[gguf.GGUFValueType.ARRAY] = 12

    class _BoundedReader(gguf.GGUFReader):
        """gguf.GGUFReader that checks each count and size against the file before reading."""

        def _left(self, offset: int) -> int:
            return len(self.data) - int(offset)

        def _get(self, offset, dtype, count=1, override_order=None):
            count, size = int(count), np.dtype(dtype).itemsize
            if count < 0 or int(offset) + size * count > len(self.data):
                raise BadGGUF(f"{size * count:,} bytes at offset {int(offset):,} run past the end of "
                              f"the file ({len(self.data):,} bytes): it is truncated or its header is corrupt")
            return super()._get(offset, dtype, count, override_order)

        def _build_fields(self, offs, count):
            if int(count) * 13 > self._left(offs):  # key length 8 + type 4 + at least 1 byte of value
                raise BadGGUF(f"the header claims {int(count):,} metadata entries, more than the file can hold")
            return super()._build_fields(offs, count)

        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) not in widths:
                raise BadGGUF(f"unknown metadata value type {int(raw_type)} at offset {int(orig_offs):,}")
            if int(raw_type) == gguf.GGUFValueType.ARRAY:
                item_type = int(self._get(orig_offs, np.uint32)[0])
                count = int(self._get(orig_offs + 4, np.uint64)[0])
                if item_type not in widths:
                    raise BadGGUF(f"unknown metadata array type {item_type} at offset {int(orig_offs):,}")
                if count * widths[item_type] > self._left(orig_offs + 12):
                    raise BadGGUF(f"a metadata array at offset {int(orig_offs):,} claims {count:,} items, "
                                  "more than the file can hold")
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensor_info(self, offs, count):
            if int(count) * 24 > self._left(offs):  # name length 8 + n_dims 4 + type 4 + offset 8
                raise BadGGUF(f"the header claims {int(count):,} tensors, more than the file can hold")
            return super()._build_tensor_info(offs, count)

        def _get_tensor_info_field(self, orig_offs):
            field = super()._get_tensor_info_field(orig_offs)
            if len(field.parts[3]) > 4:  # GGML_MAX_DIMS
                raise BadGGUF(f"tensor {field.name!r} claims {len(field.parts[3])} dimensions (at most 4)")
            return field

        def _build_tensors(self, start_offs, fields):
            for field in fields:
                name, dims = field.name, [int(d) for d in field.parts[3]]
                type_id, offset = int(field.parts[4][0]), int(field.parts[5][0])
                try:
                    kind = gguf.GGMLQuantizationType(type_id)
                except ValueError:
                    raise BadGGUF(f"tensor {name!r} has unknown type id {type_id}") from None
                block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
                if any(d <= 0 for d in dims) or (dims and dims[0] % block):
                    raise BadGGUF(f"tensor {name!r} has shape {dims}, which does not fit {kind.name} "
                                  f"blocks of {block}")
                n_bytes = int(np.prod(dims, dtype=object)) // block * block_bytes  # exact (Python ints)
                if offset % self.alignment:
                    raise BadGGUF(f"tensor {name!r} starts at {offset:,}, not a multiple of the "
                                  f"alignment {self.alignment}")
                if start_offs + offset + n_bytes > len(self.data):
                    raise BadGGUF(f"tensor {name!r} ({n_bytes:,} bytes at offset {start_offs + offset:,}) "
                                  f"runs past the end of the file ({len(self.data):,} bytes): it is truncated")
            return super()._build_tensors(start_offs, fields)

    return _BoundedReader


def read_gguf(path: Path):
    """The file's gguf.GGUFReader (memory-mapped; tensor data is read only when used)."""
    try:
        return _reader_class()(path)
    except (BadGGUF, ValueError, KeyError, IndexError, OSError, UnicodeDecodeError, RecursionError,
            OverflowError, MemoryError) as e:
        reason = str(e).replace("\n", " ") or type(e).__name__
        if isinstance(e, KeyError):
            reason = f"duplicate metadata key ({reason})"
        raise TossError(f"{path}: not a readable GGUF file ({reason})") from None


def metadata(reader) -> dict[str, Any]:
    """Metadata key -> plain Python value (float32 numbers rounded to their shortest repr)."""
    import gguf

    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
            value = [_f32(v) for v in value] if isinstance(value, list) else _f32(value)
        meta[key] = value
    return meta


def _f32(value: float) -> float:
    return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06


def read_tensor_types(path: Path) -> dict[str, str]:
    """Name -> ggml type name ("Q4_K", "F32", ...) of every tensor in the file."""
    return {t.name: t.tensor_type.name for t in read_gguf(path).tensors}


# ---------------------------------------------------------------------------- config.json

def model_config(path: Path, meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The mlx-lm / Hugging Face config.json of the model the metadata describes."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise TossError(f"{path}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if meta.get(f"{arch}.expert_count"):
        raise TossError(f"{path}: a mixture-of-experts {arch} model is not supported")
    for name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
        if name in tensors:
            raise TossError(f"{path}: RoPE scaling by per-frequency factors ({name}) is not supported")

    def need(key: str, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise TossError(f"{path}: metadata key {arch}.{key} is missing")
        return check(key, value, kind)

    def get(key: str, default: Any, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{key}")
        return default if value is None else check(key, value, kind)

    def check(key: str, value: Any, kind: type) -> Any:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok or (kind is int and not isinstance(value, int)):
            raise TossError(f"{path}: metadata {arch}.{key} = {value!r} is not a positive "
                            f"{'integer' if kind is int else 'number'}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = get("attention.key_length", hidden // heads)
    layers = need("block_count")
    found = {int(m[1]) for name in tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if len(found) != layers or found != set(range(layers)):  # the length first: block_count may be 10**9
        raise TossError(f"{path}: {arch}.block_count is {layers} but the file holds tensors for "
                        f"{len(found)} blocks")
    if heads % kv_heads:
        raise TossError(f"{path}: {heads} attention heads do not split into {kv_heads} key/value groups")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise TossError(f"{path}: no token_embd.weight tensor")
    vocab_size, embed_width = (int(d) for d in reversed(embed.shape.tolist()))
    if embed_width != hidden:
        raise TossError(f"{path}: token_embd.weight is {embed_width} wide but {arch}.embedding_length "
                        f"is {hidden}")
    eos = _token_id(path, meta, "eos", vocab_size)
    config = {
        "model_type": MODEL_TYPES[arch],
        "architectures": [HF_ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon", float),
        "rope_theta": get("rope.freq_base", 10000.0, float),
        "rope_scaling": _rope_scaling(path, meta, arch),
        "max_position_embeddings": get("context_length", 2048),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _token_id(path, meta, "bos", vocab_size),
        "eos_token_id": eos,
    }
    rotary_dim = get("rope.dimension_count", head_dim)
    if arch == "phi3":
        config["partial_rotary_factor"] = rotary_dim / head_dim
        config["original_max_position_embeddings"] = config["max_position_embeddings"]
    elif rotary_dim != head_dim:
        raise TossError(f"{path}: partial RoPE ({rotary_dim} of {head_dim} dims) is not supported for {arch}")
    if arch in ("qwen2", "phi3") and head_dim != hidden // heads:
        raise TossError(f"{path}: head size {head_dim} is not hidden size / heads, which mlx-lm's {arch} needs")
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
    if arch == "gemma3":
        # llama.cpp's gemma3 (llama-model.cpp): local layers use base 10000, every 6th layer is
        # global; the attention scale is 1/sqrt(head_dim), except the 27B (62 layers), which uses
        # 1/sqrt(hidden / heads).
        config["rope_local_base_freq"] = 10000.0
        config["sliding_window"] = get("attention.sliding_window", 512)
        # Every 6th layer is global unless the file says otherwise (a period, as our export and
        # llama.cpp's converter write it, or one bool a layer, True = sliding window).
        pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple)):
            period = next((i + 1 for i, local in enumerate(pattern) if not local), len(pattern))
            if [bool(x) for x in pattern] != [(i % period) != period - 1 for i in range(len(pattern))]:
                raise TossError(f"{path}: gemma3.attention.sliding_window_pattern {list(pattern)} "
                                "is not a layer period, which mlx-lm's gemma3 needs")
            pattern = period
        config["sliding_window_pattern"] = check("attention.sliding_window_pattern", pattern, int)
        config["query_pre_attn_scalar"] = hidden // heads if layers == 62 else head_dim
    return config


def _token_id(path: Path, meta: dict[str, Any], role: str, vocab_size: int) -> int | None:
    key = f"tokenizer.ggml.{role}_token_id"
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise TossError(f"{path}: metadata {key} = {value!r} is not a token id (the vocabulary has "
                        f"{vocab_size} tokens)")
    return value


def _rope_scaling(path: Path, meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and isinstance(factor, (int, float)) and factor > 0:
        return {"type": "linear", "rope_type": "linear", "factor": float(factor)}
    raise TossError(f"{path}: RoPE scaling {kind!r} (factor {factor!r}) is not supported (none and linear are)")


# ---------------------------------------------------------------------------- weights

def unpermute_rows(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's permutation of q/k rows (HF rotate-half halves -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(config: dict[str, Any], param_names: list[str]) -> dict[str, str]:
    """mlx-lm parameter name -> GGUF tensor name, by gguf's own per-architecture table."""
    import gguf

    arch = next(a for a, t in MODEL_TYPES.items() if t == config["model_type"])
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    table = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    names = {}
    for name in param_names:
        stem, _, suffix = name.rpartition(".")
        mapped = table.get_name(stem)
        if mapped is not None:
            names[name] = f"{mapped}.{suffix}"
    return names


def build_model(path: Path, config: dict[str, Any], tensors: dict[str, Any], dtype: mx.Dtype,
                progress: bool = False):
    """The mlx-lm model with the file's weights: dequantized, renamed, llama.cpp's transforms undone."""
    from mlx.utils import tree_flatten

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))  # parameters stay lazy: nothing allocated yet
    wanted = [name for name, _ in tree_flatten(model.parameters())]
    if config["tie_word_embeddings"]:
        wanted = [name for name in wanted if not name.startswith("lm_head.")]
    names = gguf_names(config, wanted)
    unmapped = [n for n in wanted if n not in names]
    if unmapped:
        raise TossError(f"{path}: no GGUF name for {', '.join(unmapped[:3])} (an unsupported variant)")
    missing = sorted(g for g in names.values() if g not in tensors)
    extra = sorted(set(tensors) - set(names.values()))
    if missing:
        raise TossError(f"{path}: tensors {', '.join(missing[:5])} are missing for a {config['model_type']} model")
    if extra:
        raise TossError(f"{path}: tensors {', '.join(extra[:5])} are not part of a plain "
                        f"{config['model_type']} model")

    arch = next(a for a, t in MODEL_TYPES.items() if t == config["model_type"])
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    params = {}
    for name, gname in track(names.items(), "converting tensors", enabled=progress):
        tensor = tensors[gname]
        w = dequantize(tensor)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        w = w.reshape(shape) if w.size == int(np.prod(shape)) else w
        role = gname.split(".")[-2]
        if arch == "llama" and role in heads and gname.endswith(".weight"):
            w = unpermute_rows(w, heads[role])
        elif arch == "llama" and role in heads:  # a bias: one value per row, permuted the same way
            w = unpermute_rows(w[:, None], heads[role])[:, 0]
        if arch == "gemma3" and gname.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's norms as 1 + w
        params[name] = w.astype(dtype)
        mx.eval(params[name])
    try:
        sanitize = getattr(model, "sanitize", lambda weights: weights)
        model.load_weights(list(sanitize(params).items()), strict=True)
    except ValueError as e:
        raise TossError(f"{path}: tensors do not form a {config['model_type']} model "
                        f"({str(e).splitlines()[0]})") from None
    mx.eval(model.parameters())
    return model


# Block layouts (ggml-common.h) of the types decoded with MLX: bytes per block of 32 values.
MLX_DECODED = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22}


def dequantize(tensor) -> mx.array:
    """A GGUF tensor (gguf ReaderTensor) as float32: rows x columns, the HF (out, in) layout."""
    import gguf

    kind = tensor.tensor_type.name
    raw = np.asarray(tensor.data)
    if kind in MLX_DECODED:
        return decode_blocks(raw.reshape(-1, raw.shape[-1]), kind)
    if kind in ("F32", "F16"):
        return mx.array(raw).astype(mx.float32)
    try:
        return mx.array(gguf.quants.dequantize(raw, tensor.tensor_type))
    except NotImplementedError:
        raise TossError(f"tensor {tensor.name}: type {kind} cannot be dequantized by gguf "
                        f"{_gguf_version()}") from None


def _gguf_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("gguf")


def decode_blocks(raw: np.ndarray, kind: str) -> mx.array:
    """ggml's dequantize_row_q8_0 / q4_0 / q4_1 / q5_0 in MLX: uint8 (rows, bytes) -> float32 (rows, cols)."""
    rows = raw.shape[0]
    b = mx.array(raw).reshape(rows, -1, MLX_DECODED[kind])  # (rows, blocks, bytes per block)
    d = b[..., 0:2].view(mx.float16).astype(mx.float32)  # the block's scale, (rows, blocks, 1)
    if kind == "Q8_0":
        q = b[..., 2:].view(mx.int8).astype(mx.float32)
        return (d * q).reshape(rows, -1)
    nibbles = b[..., -16:]
    # Value j (0..15) is the low nibble of byte j, value j + 16 its high nibble.
    q = mx.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(mx.uint32)
    if kind == "Q5_0":  # a 32-bit word after the scale holds bit 4 of each of the 32 values
        high = b[..., 2:6].view(mx.uint32)
        q = q | (((high >> mx.arange(32, dtype=mx.uint32)) & 1) << 4)
        return (d * (q.astype(mx.float32) - 16)).reshape(rows, -1)
    if kind == "Q4_0":
        return (d * (q.astype(mx.float32) - 8)).reshape(rows, -1)
    m = b[..., 2:4].view(mx.float16).astype(mx.float32)  # Q4_1: value = d * q + m
    return (d * q.astype(mx.float32) + m).reshape(rows, -1)


# ---------------------------------------------------------------------------- tokenizer

def build_tokenizer(path: Path, meta: dict[str, Any]):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) rebuilt from `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TossError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' "
                        "and SentencePiece 'llama' are)")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise TossError(f"{path}: metadata tokenizer.ggml.tokens missing: the file holds no usable tokenizer")
    token_types = meta.get("tokenizer.ggml.token_type") or [NORMAL_TOKEN] * len(tokens)
    if not isinstance(token_types, list) or len(token_types) != len(tokens):
        raise TossError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        tok, spelled = _byte_level_bpe(path, meta, tokens), tokens
    else:
        tok, spelled = _sentencepiece_bpe(path, meta, tokens, token_types)

    # Control tokens (<|im_end|>) and user-defined ones ("\n\n" in Gemma) are matched whole;
    # Gemma's respelled runs of spaces ("▁▁") are left to the merges.
    kinds = list(zip(spelled, token_types, tokens, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k, _ in kinds if k == CONTROL_TOKEN])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k, o in kinds if k == USER_DEFINED_TOKEN and t == o])

    def token(role: str) -> str | None:
        i = _token_id(path, meta, role, len(tokens))
        return None if i is None else spelled[i]

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds <bos> to a SentencePiece vocabulary unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if add_bos or add_eos:
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        special = {t for t, used in ((bos, add_bos), (eos, add_eos)) if used}
        steps.append(processors.TemplateProcessing(single=single, pair=pair,
                                                   special_tokens=[(t, spelled.index(t)) for t in special]))
    if steps:
        tok.post_processor = processors.Sequence(steps)

    arch = meta.get("general.architecture")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{arch}.context_length", 2048),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tok, tokenizer_config


def _byte_level_bpe(path: Path, meta: dict[str, Any], tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise TossError(f"{path}: metadata tokenizer.ggml.merges missing: the file holds no usable tokenizer")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TossError(f"{path}: the vocabulary holds duplicate tokens")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    if any(len(p) != 2 for p in pairs):
        raise TossError(f"{path}: a merge in tokenizer.ggml.merges is not two tokens separated by a space")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")

    # Llama 3's tokenizer (like tiktoken) takes a whole pre-token found in the vocabulary as is.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRE))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GPT2_REGEX_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in DIGITS_THEN_GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE + QWEN2_PRE:
        regex = LLAMA3_REGEX if pre in LLAMA3_PRE else QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        if pre in QWEN2_PRE:
            tok.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
    else:
        known = ", ".join(GPT2_REGEX_PRE + DIGITS_THEN_GPT2_PRE + LLAMA3_PRE + QWEN2_PRE)
        raise TossError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {known})")
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(path: Path, meta: dict[str, Any], tokens: list[str], token_types: list[int]):
    """SentencePiece BPE (Llama 2, Mistral, Gemma): spaces are "▁", unknown bytes fall back to <0xNN>.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose union is the
    highest-scoring token; a BPE whose merges are ranked by that score does the same,
    so without stored merges we derive them (as transformers' generate_merges does).
    Returns the tokenizer and the vocabulary as it spells it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    # Gemma stores tokens made only of spaces with real spaces; its tokenizer spells them "▁".
    spelled = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise TossError(f"{path}: the vocabulary holds duplicate tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise TossError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
        # Normal tokens, and Gemma's runs of spaces (marked user-defined, but built by merges).
        mergeable = [k == NORMAL_TOKEN or t != o for k, t, o in zip(token_types, spelled, tokens, strict=True)]
        by_position = str(meta.get("general.architecture", "")).startswith("gemma")
        pairs = _merges_from_scores(spelled, scores, mergeable, by_position)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = spelled[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(spelled) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # Llama 2 / Mistral: "Hi" reads as " Hi"
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE),
                                               normalizers.Replace(" ", SPIECE_SPACE)])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tok.decoder = decoders.Sequence(steps)
    return tok, spelled


def _merges_from_scores(tokens: list[str], scores: list[float], mergeable: list[bool],
                        by_position: bool) -> list[tuple[str, str]]:
    """Every split of a mergeable token into two vocabulary tokens, best token first.

    Best: highest score, or for Gemma earliest in the file (its scores do not follow its
    merge order, as transformers' GGUF converter notes; they agree for normal tokens).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, i in vocab.items():
        if not mergeable[i]:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((i if by_position else -scores[i], i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
