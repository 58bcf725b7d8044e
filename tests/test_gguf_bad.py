"""Malformed GGUF files: each fails `toss-mlx model import` with one clear line, exit code 2, no traceback.

Every case is a valid tiny GGUF with a few bytes changed, at offsets read from the
good file's own header (gguf.GGUFReader gives each field's offset). Counts and sizes
far beyond the file (2**60 items) must be refused before anything is read or
allocated: gguf.GGUFReader alone would loop for ever on them.
"""

import struct
from pathlib import Path

import gguf
import pytest
from gguf_files import tokenizer_metadata, write_gguf
from test_gguf import folder_weights

from toss_mlx.io import TossError
from toss_mlx.models.gguf import import_gguf

HUGE = 2**60


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("bad-gguf") / "good.gguf"
    config, weights = folder_weights(tiny_model_dir)
    config = dict(config, head_dim=config["hidden_size"] // config["num_attention_heads"])
    write_gguf(path, "llama", config, weights, tokenizer_metadata(tiny_model_dir))
    return path


class Layout:
    """Byte offsets of the parts of the good file."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(path)
        self.size = path.stat().st_size
        self.data_offset = reader.data_offset
        self.fields = reader.fields
        self.tensor_offsets = {t.name: t.field.offset for t in reader.tensors}

    def value_at(self, key: str) -> int:
        """Offset of a metadata entry's value (after key length, key and type)."""
        return self.fields[key].offset + 8 + len(key) + 4

    def type_at(self, key: str) -> int:
        return self.fields[key].offset + 8 + len(key)

    def n_dims_at(self, name: str) -> int:
        """Offset of a tensor's n_dims in the tensor table (dims, type and data offset follow)."""
        return self.tensor_offsets[name] + 8 + len(name)


def patched(data: bytes, at: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


def cases(good: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a regex the one-line message must match)."""
    data = good.read_bytes()
    lay = Layout(good)
    tokens = lay.value_at("tokenizer.ggml.tokens")  # array: item type u32, count u64
    q_at = lay.n_dims_at("blk.0.attn_q.weight")  # n_dims u32, dims u64 x2, type u32, offset u64
    half_kv = (lay.fields["general.name"].offset + lay.value_at("tokenizer.ggml.merges")) // 2
    dup_key = bytearray(data)
    old, new = b"llama.rope.freq_base", b"llama.context_length"  # same length, so only the name changes
    dup_key[dup_key.index(old):dup_key.index(old) + len(old)] = new
    dup_tensor = bytearray(data)
    old_t = b"blk.0.attn_q.weight"
    dup_tensor[dup_tensor.index(old_t):dup_tensor.index(old_t) + len(old_t)] = b"blk.0.attn_k.weight"
    bad_utf8 = bytearray(data)
    at = bad_utf8.index(b"general.name")
    bad_utf8[at:at + 2] = b"\xff\xfe"
    unreadable = "not a readable GGUF file"
    return {
        "empty": (b"", unreadable),
        "text": (b"hello, I am not a model\n", unreadable),
        "magic": (b"GGUX" + data[4:], rf"{unreadable} \(GGUF magic invalid\)"),
        "version 1": (patched(data, 4, "<I", 1), "version 1"),
        "version 99": (patched(data, 4, "<I", 99), "version 99"),
        "cut in the header": (data[:20], "past the end of the file"),
        "cut in the metadata": (data[:half_kv], "past the end of the file|more than the file can hold"),
        "cut in the tensor table": (data[:q_at + 4], "past the end of the file"),
        "cut in the tensor data": (data[:-1000], "runs past the end of the file.*truncated"),
        "huge tensor count": (patched(data, 8, "<Q", HUGE), r"claims 1,152,921,504,606,846,976 tensors"),
        "huge metadata count": (patched(data, 16, "<Q", HUGE), "metadata entries, more than the file can hold"),
        "huge key length": (patched(data, lay.fields["general.name"].offset, "<Q", HUGE),
                            "past the end of the file"),
        "huge array count": (patched(data, tokens + 4, "<Q", HUGE), "claims 1,152,921,504,606,846,976 items"),
        "huge string in an array": (patched(data, tokens + 12, "<Q", HUGE), "past the end of the file"),
        "unknown value type": (patched(data, lay.type_at("general.name"), "<I", 99), "unknown metadata value type 99"),
        "unknown array type": (patched(data, tokens, "<I", 77), "unknown metadata array type 77"),
        "many dimensions": (patched(data, q_at, "<I", 1000), "past the end of the file|dimensions"),
        "zero dimension": (patched(data, q_at + 4, "<Q", 0), r"shape \[0, "),
        "dimensions overflow": (patched(data, q_at + 4, "<QQ", 2**40, 2**40), "runs past the end of the file"),
        "unknown tensor type": (patched(data, q_at + 20, "<I", 99), "unknown type id 99"),
        "tensor offset past the end": (patched(data, q_at + 24, "<Q", 2**62), "runs past the end of the file"),
        "misaligned tensor": (patched(data, q_at + 24, "<Q", struct.unpack_from("<Q", data, q_at + 24)[0] + 1),
                              "not a multiple of the alignment 32"),
        "duplicate key": (bytes(dup_key), "duplicate metadata key"),
        "duplicate tensor": (bytes(dup_tensor), "duplicated tensor"),
        "key not utf-8": (bytes(bad_utf8), "utf-8"),
        "absurd block count": (patched(data, lay.value_at("llama.block_count"), "<I", 10**9),
                               "block_count is 1000000000 but the file holds tensors for 2 blocks"),
        "zero heads": (patched(data, lay.value_at("llama.attention.head_count"), "<I", 0),
                       "head_count = 0 is not a positive integer"),
        "eos out of range": (patched(data, lay.value_at("tokenizer.ggml.eos_token_id"), "<I", 10**6),
                             r"eos_token_id = 1000000 is not a token id \(the vocabulary has \d+ tokens\)"),
        "bos out of range": (patched(data, lay.value_at("tokenizer.ggml.bos_token_id"), "<I", 4000),
                             "bos_token_id = 4000 is not a token id"),
    }


CASE_NAMES = ["empty", "text", "magic", "version 1", "version 99", "cut in the header", "cut in the metadata",
              "cut in the tensor table", "cut in the tensor data", "huge tensor count", "huge metadata count",
              "huge key length", "huge array count", "huge string in an array", "unknown value type",
              "unknown array type", "many dimensions", "zero dimension", "dimensions overflow",
              "unknown tensor type", "tensor offset past the end", "misaligned tensor", "duplicate key",
              "duplicate tensor", "key not utf-8", "absurd block count", "zero heads", "eos out of range",
              "bos out of range"]


def test_the_good_file_imports(good, tmp_path):
    assert (import_gguf(good, tmp_path / "m") / "config.json").exists()
    assert sorted(cases(good)) == sorted(CASE_NAMES)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_malformed_file_fails_with_one_line(good, tmp_path, case):
    from toss_mlx_cli.common import app
    from toss_mlx_cli.model import doctor  # noqa: F401  (registers the model commands)
    from typer.testing import CliRunner

    data, pattern = cases(good)[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(TossError, match=pattern) as caught:
        import_gguf(bad, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(bad)), message
    assert not (tmp_path / "out").exists()

    result = CliRunner().invoke(app, ["model", "import", str(bad), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
