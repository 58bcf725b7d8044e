"""GGUF export: the fused model, the adapter alone as a llama.cpp LoRA, and an Ollama folder.

Written with the `gguf` package (GGUFWriter, TensorNameMap, gguf.quants), laid
out as llama.cpp's own converter (convert_hf_to_gguf.py / convert_lora_to_gguf.py)
lays out the same Hugging Face model, so llama.cpp, Ollama and LM Studio read it
as one of theirs:

- llama: llama.cpp permutes the rows of attn_q / attn_k (and their biases) from
  HF's rotate-half RoPE layout to interleaved pairs; `models/gguf.py` undoes that
  on import, we apply it here. A LoRA's B rows (the output side) get the same
  permutation, its A does not.
  Mistral (without a sliding window) is written as llama, as llama.cpp does.
- qwen2: q/k/v carry biases, no permutation.
- gemma3: llama.cpp stores RMSNorm weights as 1 + w (Gemma multiplies by 1 + w),
  so 1 is added to every `*norm.weight`; a multimodal Gemma 3 exports its text model.
- The tokenizer is written as `tokenizer.ggml.*` from the model folder's
  tokenizer.json: byte-level BPE as model "gpt2" (tokens, token types, merges)
  with the `tokenizer.ggml.pre` name whose split rules match the pre-tokenizer;
  SentencePiece-style BPE (Gemma's) as model "llama" (tokens, scores, types);
  plus the chat template and special token ids (gguf.SpecialVocab).

Precision: norms and biases stay F32 (as llama.cpp's converter keeps them);
f16 and q8_0 are quantized by gguf.quants. q4_k_m is llama.cpp's own mix (Q4_K,
Q6_K for attn_v / ffn_down of some layers and the output, fallbacks for rows not
a multiple of 256); the gguf package cannot write K-quants, so the f16 file is
requantized by llama.cpp's `llama_model_quantize` through llama-cpp-python.
Every export reads its file back, dequantizes it (gguf.quants) into the MLX model
and reports the largest logit difference against the float model on a fixed
prompt: the cost of the rounding, measured rather than assumed.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .checks import check_writable
from .export import (
    README_MARK,
    Adapter,
    check_output,
    is_earlier_output,
    read_adapter,
    recorded_base_model,
)
from .io import TossError, atomic_dir, write_text

GGUF_FORMATS = ("gguf", "gguf-lora", "ollama")
QUANTS = ("f16", "q8_0", "q4_k_m")
# mlx-lm model_type -> llama.cpp architecture name (gguf.MODEL_ARCH_NAMES values).
# Mistral is llama's graph (mlx-lm runs it with llama.py; llama.cpp's converter writes it as llama).
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
# ("gemma3", the multimodal Gemma 3, exports its text model: text_config.)
# Text whose tokens the logit check runs on (any tokenizer covers it).
CHECK_TEXT = "The capital of France is Paris. Natalia sold 48 clips in April, then half as many."
# tokenizer.ggml.pre names for the pre-tokenizers llama.cpp implements (llama-vocab.cpp).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class GGUFExport:
    """What an export wrote and what its read-back check measured."""

    out: Path
    fmt: str
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    arch: str = ""
    quant: str = ""
    max_logit_diff: float | None = None  # |logits(file) - logits(float model)|, max over the prompt
    top1_agreement: float | None = None  # share of prompt positions with the same argmax
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    base_quantized: bool = False  # the MLX base was quantized: its fused sum is requantized here
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Architecture checks and tensor layout


def gguf_arch(config: dict[str, Any], source: str) -> str:
    """llama.cpp's name for the model's architecture; refuses what cannot be exported faithfully."""
    kind = config.get("model_type")
    if kind not in ARCHS:
        raise TossError(f"{source}: architecture {kind!r} cannot be exported to GGUF "
                        f"(supported: {', '.join(ARCHS)}); fuse it (toss-mlx fuse) and convert "
                        "the folder with llama.cpp's convert_hf_to_gguf.py")
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            raise TossError(f"{source}: a mixture-of-experts model cannot be exported to GGUF here")
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("type") or scaling.get("rope_type")) != "linear":
        raise TossError(f"{source}: RoPE scaling {scaling!r} cannot be exported (none and linear "
                        "can; Llama-3.1-style scaling needs llama.cpp's rope_freqs tensor)")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    if kind == "gemma3_text":
        pattern = config.get("sliding_window_pattern", 6)
        scalar = config.get("query_pre_attn_scalar", 256)
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B).
        expected = hidden / heads if config["num_hidden_layers"] == 62 else head_dim
        if scalar != expected:
            raise TossError(f"{source}: query_pre_attn_scalar {scalar} differs from the {expected:g} "
                            "llama.cpp uses for this model size; the GGUF would attend differently")
        if not isinstance(pattern, int) or pattern < 1:
            raise TossError(f"{source}: sliding_window_pattern {pattern!r} is not a layer period")
    if kind == "mistral" and config.get("sliding_window") is not None:
        raise TossError(f"{source}: Mistral with a sliding window ({config['sliding_window']}) "
                        "cannot be exported (llama.cpp's llama attends to the whole context)")
    if kind == "qwen2" and config.get("use_sliding_window"):
        raise TossError(f"{source}: qwen2 with use_sliding_window cannot be exported "
                        "(llama.cpp's qwen2 attends to the whole context)")
    return ARCHS[kind]


def _tensor_map(arch: str, layers: int):
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.TensorNameMap(arch_id, layers)


def gguf_name(name_map, name: str) -> str | None:
    """llama.cpp's tensor name for an HF / mlx-lm parameter name ("model.layers.0.self_attn.q_proj.weight" -> "blk.0.attn_q.weight")."""
    return name_map.get_name(name, try_suffixes=(".weight", ".bias"))


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf LlamaModel.permute); inverse of models.gguf.unpermute_rows."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(config: dict[str, Any], name: str) -> int | None:
    """Heads whose rows llama.cpp permutes in this llama parameter, or None."""
    if ARCHS.get(config.get("model_type")) != "llama":
        return None
    if ".self_attn.q_proj." in name:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in name:
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def to_gguf_layout(config: dict[str, Any], name: str, w: np.ndarray) -> np.ndarray:
    if (heads := _qk_heads(config, name)) is not None:
        return permute_rows(w, heads)
    if config.get("model_type") == "gemma3_text" and name.endswith("norm.weight"):
        return w + 1.0  # Gemma3RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
    return w


def from_gguf_layout(config: dict[str, Any], name: str, w: np.ndarray) -> np.ndarray:
    if (heads := _qk_heads(config, name)) is not None:
        return unpermute_rows(w, heads)
    if config.get("model_type") == "gemma3_text" and name.endswith("norm.weight"):
        return w - 1.0
    return w


def tensor_type(name: str, w: np.ndarray, quant: str):
    """The GGML type of one tensor at the export's first (gguf-package) stage."""
    import gguf

    T = gguf.GGMLQuantizationType
    if w.ndim < 2:
        return T.F32  # norms and biases: llama.cpp keeps them in float32
    if quant == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16  # f16, q4_k_m's intermediate, and rows Q8_0 blocks do not divide


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata


def _pre_tokenizer_name(tokenizer_json: dict[str, Any], source: str) -> str:
    """tokenizer.ggml.pre for a byte-level BPE, from the structure of its pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"  # llama.cpp: \p{N} split, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
        if regex == QWEN2_REGEX:
            return "qwen2"
    raise TossError(f"{source}: pre-tokenizer {json.dumps(pre)[:200]} matches none llama.cpp "
                    "implements here (gpt-2, smollm, llama-bpe, qwen2): it would split text "
                    "differently from the model's own tokenizer")


def check_tokenizer(model_dir: Path) -> tuple[dict[str, Any], str | None]:
    """(tokenizer.json, its tokenizer.ggml.pre name or None for SentencePiece); refuses the rest."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise TossError(f"{model_dir}: no tokenizer.json; the GGUF must carry the tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise TossError(f"{path}: only BPE tokenizers are exported to GGUF here, byte-level "
                        "or SentencePiece-style with byte fallback (this one is "
                        f"{model.get('type')!r}); convert the fused folder (toss-mlx fuse) "
                        "with llama.cpp's convert_hf_to_gguf.py")
    return data, (_pre_tokenizer_name(data, str(path)) if byte_level else None)


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.* as convert_hf_to_gguf's _set_vocab_gpt2 writes them, plus the chat template."""
    import gguf
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    data, pre = check_tokenizer(model_dir)
    if pre is None:
        return add_sentencepiece_tokenizer(writer, model_dir, data, vocab_size)
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    if max(vocab.values()) >= vocab_size:
        raise TossError(f"{path}: token id {max(vocab.values())} does not fit the model's "
                        f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows with no token (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special or re.fullmatch(r"<\|.*\|>|<.*>", by_id[i]) is not None
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        raise TossError(f"{path}: no BPE merges found; the GGUF tokenizer would not work")


def add_sentencepiece_tokenizer(writer, model_dir: Path, data: dict[str, Any], vocab_size: int) -> None:
    """tokenizer.ggml.model "llama" (SentencePiece BPE), as convert_hf_to_gguf's _set_vocab_sentencepiece.

    Built from tokenizer.json, whose merges Hugging Face derived from the SentencePiece
    scores (a pair's rank = its merged piece's score order): each piece made by a merge
    gets score -rank, so llama.cpp, which merges the best-scored adjacent pair, merges
    in Hugging Face's order. Byte pieces <0xNN> are BYTE tokens (byte fallback).
    """
    import gguf

    path = model_dir / "tokenizer.json"
    model = data["model"]
    pieces: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        pieces[i] = t["content"]
    if max(pieces) >= vocab_size:
        raise TossError(f"{path}: token id {max(pieces)} does not fit the model's vocab_size {vocab_size}")
    scores_by_piece: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores_by_piece.setdefault(left + right, -float(rank))
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        piece = pieces.get(i)
        if piece is None:
            tokens.append(f"[PAD{i}]")
            kind = T.UNUSED
        else:
            tokens.append(piece)
            if i in added:
                kind = T.CONTROL if added[i].get("special") else T.USER_DEFINED
            elif piece == unk:
                kind = T.UNKNOWN
            elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
                kind = T.BYTE
            else:
                kind = T.NORMAL
        types.append(kind)
        scores.append(scores_by_piece.get(tokens[-1], 0.0) if kind == T.NORMAL else 0.0)
    normalizer = json.dumps(data.get("normalizer"))
    pre_tokenizer = json.dumps(data.get("pre_tokenizer"))
    # A leading "▁" added to the text (Llama 2's prepend) is add_space_prefix; Gemma adds none.
    prepends = '"Prepend"' in normalizer or '"prepend_scheme": "always"' in pre_tokenizer \
        or '"add_prefix_space": true' in pre_tokenizer
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prepends)
    special = gguf.SpecialVocab(model_dir, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------
# The model GGUF


def _hparams(writer, config: dict[str, Any], arch: str) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if arch == "gemma3":
        writer.add_rope_freq_base(config.get("rope_theta", 1_000_000.0))
        writer.add_rope_freq_base_swa(config.get("rope_local_base_freq", 10_000.0))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.get("sliding_window", 512))
        writer.add_sliding_window_pattern(config.get("sliding_window_pattern", 6))
    else:
        writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
        if head_dim != hidden // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if (scaling := config.get("rope_scaling")) and scaling.get("factor"):
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def model_tensors(model, config: dict[str, Any], arch: str, source: str):
    """Yield (GGUF name, float32 array in llama.cpp's layout) of every model parameter, one at a time."""
    from mlx.utils import tree_flatten

    name_map = _tensor_map(arch, config["num_hidden_layers"])
    params = tree_flatten(model.parameters())
    for name, _ in params:  # every name is checked before the first tensor is converted
        if gguf_name(name_map, name) is None:
            raise TossError(f"{source}: parameter {name} has no llama.cpp {arch} tensor")
    for name, w in params:
        yield gguf_name(name_map, name), to_gguf_layout(config, name, np.array(w.astype(mx.float32)))


def write_model_gguf(path: Path, model, config: dict[str, Any], model_dir: Path, quant: str,
                     name: str, source: str) -> None:
    """Write `model` (float weights, mlx-lm names) as a llama.cpp GGUF of type f16 or q8_0."""
    import gguf

    if config.get("model_type") == "gemma3":  # multimodal Gemma 3: its text model
        model, config = model.language_model, text_config(config)
    arch = gguf_arch(config, source)
    tensors = model_tensors(model, config, arch, source)
    # use_temp_file: converted tensors go to a spooled temp file, not all into memory at once.
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    ftype = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, config, arch)
    add_tokenizer(writer, model_dir, config["vocab_size"])
    for target, array in tensors:
        qtype = tensor_type(target, array, quant)
        writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    """Requantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize)."""
    import ctypes

    import llama_cpp

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor to the terminal
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise TossError(f"{src}: llama.cpp's quantizer failed (code {rc})")


def _require_llama_cpp(quant: str) -> None:
    import importlib.util

    if quant == "q4_k_m" and importlib.util.find_spec("llama_cpp") is None:
        raise TossError("--quant q4_k_m uses llama.cpp's own quantizer (the gguf package cannot "
                        "write K-quants): pip install llama-cpp-python, or export --quant f16 and "
                        "run: llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M")


# ---------------------------------------------------------------------------------------------
# Read-back check


def read_gguf_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(every tensor of a GGUF dequantized to float32 in numpy's (rows, cols) order, type counts)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out, kinds = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml's ne is innermost-first
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return out, kinds


def check_prompt(tokenizer) -> list[int]:
    return list(tokenizer.encode(CHECK_TEXT))[:32]


def readback_logit_diff(model, config: dict[str, Any], arch: str, path: Path,
                        tokens: list[int]) -> tuple[float, float, dict[str, int]]:
    """(max |logit difference|, top-1 agreement, tensor type counts) of the GGUF against `model`.

    Puts the file's dequantized weights into `model` in place (it is not used after).
    """
    reference = np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]
    name_map = _tensor_map(arch, config["num_hidden_layers"])
    from mlx.utils import tree_flatten

    by_gguf = {gguf_name(name_map, n): n for n, _ in tree_flatten(model.parameters())}
    weights = []
    arrays, kinds = read_gguf_tensors(path)
    for target, array in arrays.items():
        name = by_gguf[target]
        weights.append((name, mx.array(from_gguf_layout(config, name, array))))
    model.load_weights(weights, strict=True)
    got = np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]
    diff = float(np.abs(got - reference).max())
    agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
    return diff, agree, kinds


# ---------------------------------------------------------------------------------------------
# LoRA GGUF


def lora_tensors(adapter: Adapter, config: dict[str, Any], arch: str,
                 source: str) -> dict[str, np.ndarray]:
    """`blk.N.<tensor>.weight.lora_a` (r, in) / `.lora_b` (out, r), as convert_lora_to_gguf writes them."""
    if adapter.dora:
        raise TossError(f"{adapter.folder}: a DoRA adapter cannot be written as a llama.cpp LoRA "
                        "(llama.cpp has no DoRA); export --format gguf to fuse it into the model")
    name_map = _tensor_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", arch == "gemma3")
    out = {}
    for path, leaves in adapter.modules.items():
        leaf = path.rsplit(".", 1)[-1]
        target = gguf_name(name_map, f"{path.removeprefix(TEXT_PREFIX)}.weight")
        if target is None or leaf == "embed_tokens" or target.startswith("token_embd"):
            raise TossError(f"{adapter.folder}: {path} has no llama.cpp {arch} LoRA tensor "
                            "(only the layers' linear projections and an untied lm_head do); "
                            "export --format gguf to fuse it instead")
        if target.startswith("output.") and tied:
            raise TossError(f"{adapter.folder}: {path} adapts a head tied to the embeddings; "
                            "llama.cpp applies LoRA to no such tensor; export --format gguf")
        a = np.array(leaves["lora_a"].astype(mx.float32))  # (in, r)
        b = np.array(leaves["lora_b"].astype(mx.float32))  # (r, out)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise TossError(f"{adapter.folder}: {path} LoRA shapes {a.shape} x {b.shape} are not "
                            "one low-rank pair")
        b_rows = b.T  # (out, r): its rows are the weight's output rows
        if (heads := _qk_heads(config, f"{path}.weight")) is not None:
            b_rows = permute_rows(b_rows, heads)
        out[f"{target}.lora_a"] = np.ascontiguousarray(a.T)
        out[f"{target}.lora_b"] = np.ascontiguousarray(b_rows)
    return out


def write_lora_gguf(path: Path, adapter: Adapter, config: dict[str, Any], source: str,
                    name: str) -> None:
    import gguf

    arch = gguf_arch(config, source)
    tensors = lora_tensors(adapter, config, arch, source)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / rank; mlx-lm by `scale`: alpha = scale * rank.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.scale * adapter.rank))
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for target, array in tensors.items():
        writer.add_tensor(target, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Ollama


@dataclass
class ChatSegments:
    """A chat template as fixed text around each turn (what an Ollama TEMPLATE can express)."""

    system_pre: str
    system_post: str
    user_pre: str
    user_post: str
    assistant_pre: str
    assistant_post: str
    generation: str  # the add_generation_prompt text after the last user turn
    default_system: str | None  # the system text the template inserts when none is given
    system_in_user: bool  # Gemma: the system text opens the first user turn (no user_pre after it)


MARKS = {"system": "\u2063SYS\u2063", "u1": "\u2063U1\u2063", "a1": "\u2063A1\u2063",
         "u2": "\u2063U2\u2063", "a2": "\u2063A2\u2063"}


def _render(tokenizer, messages: list[dict[str, str]], generation: bool, strip_bos: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = getattr(tokenizer, "bos_token", None)
    # A runtime that adds the BOS token itself (tokenizer.ggml.add_bos_token) must not find it in
    # the template's text too. Only then: SmolLM2's BOS is <|im_start|>, which opens every turn.
    if strip_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def _split(text: str, marks: list[str]) -> list[str] | None:
    pieces = []
    for mark in marks:
        head, found, text = text.partition(mark)
        if not found:
            return None
        pieces.append(head)
    return pieces + [text]


def chat_segments(tokenizer, strip_bos: bool = False) -> ChatSegments | None:
    """Segment the model's Jinja chat template; None if it is not fixed text around turns.

    strip_bos: the runtime adds the BOS token (tokenizer.ggml.add_bos_token), so a BOS the
    template writes is left out of the segments.
    """
    M = MARKS

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return _render(tokenizer, messages, generation, strip_bos)

    def msg(role: str, key: str) -> dict[str, str]:
        return {"role": role, "content": M[key]}

    try:
        full = _split(render([msg("system", "system"), msg("user", "u1"),
                              msg("assistant", "a1"), msg("user", "u2")], True),
                      [M["system"], M["u1"], M["a1"], M["u2"]])
        one_gen = _split(render([msg("user", "u1")], True), [M["u1"]])
        one = _split(render([msg("user", "u1")], False), [M["u1"]])
        pair = _split(render([msg("user", "u1"), msg("assistant", "a1")], False),
                      [M["u1"], M["a1"]])
    except Exception:  # templates that raise on a system turn, on no system turn, ...
        return None
    if not (full and one_gen and one and pair):
        return None
    p0, p1, p2, p3, p4 = full
    user_post = one[1]
    if not one_gen[1].startswith(user_post) or not p2.startswith(user_post):
        return None
    generation = one_gen[1][len(user_post):]
    assistant_post = pair[2]
    if not p3.startswith(assistant_post):
        return None
    user_pre = p3[len(assistant_post):]
    assistant_pre = p2[len(user_post):]
    system_in_user = not p1.endswith(user_pre)
    system_post = p1 if system_in_user else p1[:len(p1) - len(user_pre)]
    head = one[0]  # what comes before the first user turn when no system turn is given
    default_system = None
    if head != user_pre:
        start, end = p0, system_post + ("" if system_in_user else user_pre)
        if not (head.startswith(start) and head.endswith(end)) or len(head) < len(start) + len(end):
            return None
        default_system = head[len(start):len(head) - len(end)]
    segs = ChatSegments(p0, system_post, user_pre, user_post, assistant_pre, assistant_post,
                        generation, default_system, system_in_user)
    # The segments must reproduce the Jinja template on conversations it was not derived from.
    probes = [
        ([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?")], True),
        ([("user", "Hi"), ("assistant", "Hello!"), ("user", "More"), ("assistant", "Sure.")], False),
        ([("user", "Only one")], True),
    ]
    for turns, generation_prompt in probes:
        messages = [{"role": r, "content": c} for r, c in turns]
        if render_segments(segs, messages, generation_prompt) != render(messages, generation_prompt):
            return None
    return segs


def render_segments(segs: ChatSegments, messages: list[dict[str, str]], generation: bool) -> str:
    """What the Ollama TEMPLATE of `segs` renders (the Python twin of go_template)."""
    if segs.default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": segs.default_system}] + messages
    out, previous = [], ""
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            out += [segs.system_pre, m["content"], segs.system_post]
        elif m["role"] == "user":
            if not (segs.system_in_user and previous == "system"):
                out.append(segs.user_pre)
            out += [m["content"], segs.user_post] + ([segs.generation] if last and generation else [])
        else:
            out += [segs.assistant_pre, m["content"], segs.assistant_post]
        previous = m["role"]
    return "".join(out)


def _go(text: str) -> str:
    """A Go template action printing `text` (JSON string escapes are valid Go string escapes)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(segs: ChatSegments) -> str:
    """The Ollama (Go text/template) TEMPLATE for `segs`; literals are quoted so {{- never trims them."""
    user_pre = _go(segs.user_pre)
    if segs.system_in_user:
        user_pre = '{{ if ne $prev "system" }}' + user_pre + "{{ end }}"
    return "".join([
        '{{- $prev := "" }}',
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "system" }}', _go(segs.system_pre), "{{ .Content }}", _go(segs.system_post),
        '{{- else if eq .Role "user" }}', user_pre, "{{ .Content }}", _go(segs.user_post),
        "{{ if $last }}", _go(segs.generation), "{{ end }}",
        '{{- else if eq .Role "assistant" }}', _go(segs.assistant_pre), "{{ .Content }}",
        _go(segs.assistant_post),
        "{{- end }}",
        "{{- $prev = .Role }}",
        "{{- end }}",
    ])


def stop_tokens(segs: ChatSegments | None, tokenizer) -> list[str]:
    """The special tokens that end an assistant turn, plus the EOS token."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) or []]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials += [t.content for t in added.values() if getattr(t, "special", False)]
    stops = []
    if segs is not None:
        for t in sorted(set(specials), key=len, reverse=True):
            if t and t in segs.assistant_post and t not in stops:
                stops.append(t)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def _triple_quoted(text: str) -> str:
    if '"""' in text:
        raise TossError('the system prompt holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def render_modelfile(gguf_file: str, segs: ChatSegments | None, stops: list[str],
                     system_prompt: str | None) -> str:
    lines = [f"FROM ./{gguf_file}", ""]
    if segs is not None:
        lines += [f"TEMPLATE {_triple_quoted(go_template(segs))}", ""]
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    system = system_prompt if system_prompt is not None else (segs.default_system if segs else None)
    if system:
        lines += ["", f"SYSTEM {_triple_quoted(system)}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# README


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def render_readme(result: GGUFExport, adapter: Adapter, base_model: str, ollama_name: str) -> str:
    files = "\n".join(f"- `{name}` ({_fmt_size(size)})" for name, size in sorted(result.files.items()))
    kind = "DoRA" if adapter.dora else "LoRA"
    lines = [
        f"# {result.fmt} export by toss-mlx ({result.arch})",
        README_MARK,
        "",
        f"- Base model: `{base_model}`",
        f"- Adapter: {kind}, rank {adapter.rank}, scale {adapter.scale:g} from `{adapter.folder}`",
        "",
        files,
        "",
    ]
    if result.fmt == "gguf-lora":
        lines += [
            "The adapter alone, as a llama.cpp LoRA GGUF (general.type = adapter, "
            f"adapter.lora.alpha = {adapter.scale * adapter.rank:g}). It runs on a GGUF of the "
            "same base model: the GGUF the base was imported from (`toss-mlx model import`, the "
            "registry's SmolLM2: the adapter was trained on exactly its weights), or llama.cpp's "
            "`convert_hf_to_gguf.py BASE_FOLDER --outtype f16` of a Hugging Face base:",
            "",
            "```sh",
            "llama-server -m base.gguf --lora adapter.gguf",
            'llama-cli -m base.gguf --lora adapter.gguf -p "Hello"',
            "```",
            "",
            "Ollama (`Modelfile`): `FROM ./base.gguf` and `ADAPTER ./adapter.gguf`.",
        ]
    else:
        gguf_file = next(n for n in result.files if n.endswith(".gguf"))
        lines += [
            f"The base model with the adapter folded into its weights, quantized {result.quant}"
            + (" (the MLX base was quantized: the fused sum is requantized here)"
               if result.base_quantized else "") + ".",
            "",
        ]
        if result.max_logit_diff is not None:
            lines += [f"Read-back check: the file's weights, dequantized, give logits within "
                      f"{result.max_logit_diff:.4f} (max |difference|) of the float fused model "
                      f"on a fixed prompt; the top token agrees at "
                      f"{100 * result.top1_agreement:.0f}% of its positions.", ""]
        lines += [
            "```sh",
            f"llama-server -m {gguf_file}",
            f'llama-cli -m {gguf_file} -p "Hello"',
            "```",
            "",
        ]
        if result.fmt == "ollama":
            lines += [
                "Ollama: this folder's `Modelfile` names the GGUF, the chat template and its "
                "stop tokens.",
                "",
                "```sh",
                f"ollama create {ollama_name} -f Modelfile",
                f"ollama run {ollama_name}",
                "```",
            ]
        else:
            lines += ["LM Studio: copy the `.gguf` into its models folder "
                      "(`lms import " + gguf_file + "`)."]
    lines += [""] + [f"Note: {n}" for n in result.notes] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point


def _load_fused(model_spec: str, adapter_dir: Path):
    """(float32 fused model, tokenizer, config, model folder, base was quantized)."""
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model, load

    from .fuse import fuse_layers
    from .models.load import apply_adapter, is_quantized, resolve_model_path

    path = Path(resolve_model_path(model_spec))
    try:
        model, tokenizer, config = load(str(path), return_config=True)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TossError(f"{model_spec}: could not load the model ({e})") from None
    quantized = is_quantized(model)
    apply_adapter(model, adapter_dir)
    fuse_layers(model, dequantize=True)
    model = dequantize_model(model)
    model.update(tree_map(lambda w: w.astype(mx.float32)
                          if mx.issubdtype(w.dtype, mx.floating) else w, model.parameters()))
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if config.get("model_type") == "gemma3":
        model, config = model.language_model, text_config(config)
    return model, tokenizer, config, path, quantized


def _read_config(model_spec: str) -> tuple[dict[str, Any], Path]:
    from .models.load import resolve_model_path

    path = Path(resolve_model_path(model_spec))
    if not (path / "config.json").exists():
        raise TossError(f"{model_spec}: needs a local model folder (config.json) for a GGUF export")
    return text_config(json.loads((path / "config.json").read_text())), path


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal Gemma 3 ("gemma3") exports its text model.

    llama.cpp's converter does the same (the vision tower goes to a separate mmproj file).
    Its text_config omits defaults, so they are filled in by mlx-lm's own ModelArgs.
    """
    if config.get("model_type") != "gemma3" or not isinstance(config.get("text_config"), dict):
        return config
    import dataclasses

    from mlx_lm.models import gemma3, gemma3_text

    args = gemma3.ModelArgs.from_dict(config)  # sets the text model's vocab size and heads
    text = dataclasses.asdict(gemma3_text.ModelArgs.from_dict(args.text_config))
    text.update(model_type="gemma3_text", eos_token_id=config.get("eos_token_id"),
                bos_token_id=config.get("bos_token_id"))
    return text


TEXT_PREFIX = "language_model."  # mlx-lm's multimodal Gemma 3 keeps its text model here


def export_gguf(adapter_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "gguf",
                model: str | None = None, quant: str = "f16", system_prompt: str | None = None,
                name: str | None = None) -> GGUFExport:
    """Write `fmt` ("gguf", "gguf-lora" or "ollama") of the adapter on `model` to `out`."""
    if fmt not in GGUF_FORMATS:
        raise TossError(f"unknown GGUF format {fmt!r} (expected one of {', '.join(GGUF_FORMATS)})")
    if quant not in QUANTS:
        raise TossError(f"unknown --quant {quant!r} (expected one of {', '.join(QUANTS)})")
    start = time.perf_counter()
    adapter = read_adapter(adapter_dir)
    out = Path(out)
    check_output(out, adapter.folder)
    base_model = model or recorded_base_model(adapter.config)
    if base_model is None:
        raise TossError(f"{adapter.folder}: the adapter records no base model; pass --model")
    # Everything that can be refused is refused before any weights are loaded or written.
    config, model_dir = _read_config(base_model)
    check_output(out, model_dir)
    arch = gguf_arch(config, base_model)
    if out.exists() and any(out.iterdir()) and not is_earlier_output(out):
        raise TossError(f"{out}: folder exists and holds other files; choose another --out or empty it")
    check_writable(out, "export folder", folder=True)  # before any weights are loaded (issue 17)
    label = name or f"{model_dir.name}-toss"
    result = GGUFExport(out, fmt, arch=arch, quant=quant if fmt != "gguf-lora" else "f32")
    if fmt == "gguf-lora":
        lora_tensors(adapter, config, arch, base_model)  # refuses DoRA, embeddings, tied heads
        with atomic_dir(out, replaceable=is_earlier_output) as tmp:
            write_lora_gguf(tmp / "adapter.gguf", adapter, config, base_model, label)
            result.files = {"adapter.gguf": (tmp / "adapter.gguf").stat().st_size}
            result.seconds = time.perf_counter() - start
            write_text(tmp / "README.md", render_readme(result, adapter, base_model, label))
        return result

    _require_llama_cpp(quant)
    check_tokenizer(model_dir)
    fused, tokenizer, config, model_dir, result.base_quantized = _load_fused(base_model, adapter.folder)
    segs = stops = None
    if fmt == "ollama":
        import gguf

        adds_bos = bool(gguf.SpecialVocab(model_dir).add_special_token.get("bos", False))
        segs = chat_segments(tokenizer, strip_bos=adds_bos)
        stops = stop_tokens(segs, tokenizer)
        if segs is None:
            result.notes.append("the chat template is not fixed text around turns, so the "
                                "Modelfile has no TEMPLATE: Ollama falls back to the GGUF's "
                                "tokenizer.chat_template")
    if result.base_quantized:
        result.notes.append(
            "the MLX base model is quantized; its dequantized weights plus the adapter are "
            + ("written in f16" if quant == "f16" else f"requantized to {quant}, which shifts the "
               "logits (see the read-back difference)"))
    gguf_file = f"model-{quant}.gguf"
    with atomic_dir(out, replaceable=is_earlier_output) as tmp:
        first = tmp / ("model-f16.tmp.gguf" if quant == "q4_k_m" else gguf_file)
        write_model_gguf(first, fused, config, model_dir, quant, label, base_model)
        if quant == "q4_k_m":
            llama_cpp_quantize(first, tmp / gguf_file, quant)
            first.unlink()
        tokens = check_prompt(tokenizer)
        result.max_logit_diff, result.top1_agreement, result.tensor_types = readback_logit_diff(
            fused, config, arch, tmp / gguf_file, tokens)
        if quant == "q4_k_m" and (fallback := {k: n for k, n in result.tensor_types.items()
                                               if k not in ("Q4_K", "Q6_K", "F32")}):
            result.notes.append(
                "llama.cpp's K-quants need rows of a multiple of 256 values, so "
                + " and ".join(f"{n} tensors are {k}" for k, n in sorted(fallback.items()))
                + " (its fallback), next to "
                + " and ".join(f"{result.tensor_types.get(k, 0)} {k}" for k in ("Q4_K", "Q6_K")))
        if fmt == "ollama":
            write_text(tmp / "Modelfile", render_modelfile(gguf_file, segs, stops, system_prompt))
        result.files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        result.seconds = time.perf_counter() - start
        write_text(tmp / "README.md", render_readme(result, adapter, base_model,
                                                    re.sub(r"[^a-z0-9._-]+", "-", label.lower())))
    return result
