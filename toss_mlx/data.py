"""Data: rows of a file -> conversations -> tokens + response masks.

One story, top to bottom:
1. `read_rows` reads JSONL / JSON / parquet (or a hub dataset) and keeps each
   row's original index; JSON errors name the file and line.
2. `to_messages` turns a row of any supported format (chat `messages`,
   `prompt`/`completion`, OpenOrca `question`/`response`, alpaca
   `instruction`/`input`/`output`) into a list of {role, content} messages.
3. `render` writes the conversation as text with the model's chat template or
   the paper's plain template, and returns the character spans of every
   assistant answer (plus its end-of-turn token).
4. `tokenize_dataset` tokenizes prompt and answer segments separately (as the
   model sees them at inference), marks the answer tokens as response tokens,
   truncates at `max_seq_len`, and
   fingerprints the data and tokenizer so that scores and masks can never be
   applied to other data.

`response_mask[j] == 1` means token j is a response token: it is predicted
from tokens < j and is the only kind of token that gets a loss or a score.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import TossError, sha256_bytes, sha256_file

FORMATS = ("auto", "messages", "prompt_completion", "question_response", "alpaca")
TEMPLATES = ("chat", "plain")
ROLES = ("system", "user", "assistant")

# Rows longer than this many characters are refused before tokenizing (or skipped with
# --skip-bad-rows): 1M characters, or 64 per token of max_seq_len if that is more.
# Text runs at about 4 characters per token, so such a row would be cut to a small
# fraction of itself anyway, after a tokenization that costs time and memory
# (a 21 MB row: 40 s and 4.9 GB to keep 64 tokens). Documented in the README.
MAX_ROW_CHARS = 1_000_000
CHARS_PER_TOKEN = 64


def max_row_chars(max_seq_len: int) -> int:
    return max(MAX_ROW_CHARS, CHARS_PER_TOKEN * int(max_seq_len))


# The paper's template (and the official code's): one "Human:/Assistant:" exchange + eos.
PLAIN_USER = "Human: {user}\nAssistant: "


@dataclass
class Row:
    index: int  # 0-based position in the source; for JSONL the line number minus one
    data: dict[str, Any]


@dataclass
class Sample:
    row_index: int
    tokens: np.ndarray  # int32 [L]
    response_mask: np.ndarray  # bool [L]
    truncated: bool = False


@dataclass
class TokenizedData:
    samples: list[Sample]
    fingerprint: dict[str, Any]  # dataset_sha256, tokenizer_sha256, template, max_seq_len
    source: str
    truncated: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, problem)
    no_response: int = 0  # samples whose truncation left no response token (they teach nothing)

    @property
    def response_tokens(self) -> int:
        return int(sum(s.response_mask.sum() for s in self.samples))

    def flat(self) -> dict[str, np.ndarray]:
        """The flat layout shared by scores and masks: offsets, row_index, token_ids, response_mask."""
        lengths = [len(s.tokens) for s in self.samples]
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt)) if self.samples else (
            lambda xs, dt: np.zeros(0, dt))
        return {
            "offsets": offsets,
            "row_index": np.array([s.row_index for s in self.samples], np.int64),
            "token_ids": cat([s.tokens for s in self.samples], np.int32),
            "response_mask": cat([s.response_mask for s in self.samples], np.uint8),
        }

    def summary(self) -> str:
        parts = [f"{len(self.samples)} samples", f"{self.response_tokens} response tokens"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated at {self.fingerprint['max_seq_len']} tokens")
        if self.no_response:
            parts.append(f"warning: {self.no_response} keep no response token within "
                         f"{self.fingerprint['max_seq_len']} tokens (raise --max-seq-len)")
        if self.skipped:
            lines = ", ".join(str(line) for line, _ in self.skipped[:10])
            more = "..." if len(self.skipped) > 10 else ""
            parts.append(f"{len(self.skipped)} bad rows skipped (lines {lines}{more})")
        return f"{self.source}: " + ", ".join(parts)


class BadRow(TossError):
    def __init__(self, source: str, line: int, problem: str):
        super().__init__(f"{source}:{line}: {problem}")
        self.line = line
        self.problem = problem


# ---------------------------------------------------------------- 1. reading


def read_rows(path: str | os.PathLike, skip_bad_rows: bool = False,
              skipped: list[tuple[int, str]] | None = None) -> list[Row]:
    """Read every row of a JSONL/JSON/parquet file, or a hub dataset name ("name[:split]")."""
    p = Path(path)
    if not p.exists():
        if os.sep in str(path) or p.suffix:
            raise TossError(f"{path}: data file not found")
        return _read_hub(str(path))
    if p.is_dir():
        raise TossError(f"{path}: is a folder; give a .jsonl, .json or .parquet file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_with_datasets("parquet", str(p))
    text = _read_utf8(p)
    if suffix == ".json" or (suffix != ".jsonl" and text.lstrip().startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TossError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
        if not isinstance(data, list):
            raise TossError(f"{path}: expected a JSON list of rows (or JSON Lines)")
        rows = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                _bad(str(path), i + 1, "row is not a JSON object", skip_bad_rows, skipped)
                continue
            rows.append(Row(i, item))
        return rows
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(str(path), i + 1, f"malformed JSON ({e.msg}, column {e.colno})", skip_bad_rows, skipped)
            continue
        if not isinstance(item, dict):
            _bad(str(path), i + 1, "row is not a JSON object", skip_bad_rows, skipped)
            continue
        rows.append(Row(i, item))
    if not rows and not (skipped or []):
        raise TossError(f"{path}: no rows")
    return rows


def _read_utf8(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 (latin-1, binary) are an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise TossError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from None


def check_text_files(paths) -> None:
    """Fail now, before any compute, on a data file that is not UTF-8 (naming its line)."""
    for path in paths:
        p = Path(path) if path is not None else None
        if p is not None and p.is_file() and p.suffix.lower() != ".parquet":
            _read_utf8(p)


def _bad(source: str, line: int, problem: str, skip: bool, skipped: list | None) -> None:
    if not skip:
        raise BadRow(source, line, problem + " (use --skip-bad-rows to skip such rows)")
    if skipped is not None:
        skipped.append((line, problem))


def _read_with_datasets(kind: str, path: str) -> list[Row]:
    from datasets import load_dataset

    try:
        ds = load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise TossError(f"{path}: could not read as {kind} ({e})") from None
    return [Row(i, dict(r)) for i, r in enumerate(ds)]


def _read_hub(name: str) -> list[Row]:
    from datasets import load_dataset

    repo, _, split = name.partition(":")
    try:
        ds = load_dataset(repo, split=split or "train")
    except Exception as e:
        raise TossError(f"{name}: not a local file, and not loadable as a hub dataset ({e})") from None
    return [Row(i, dict(r)) for i, r in enumerate(ds)]


# ---------------------------------------------------------------- 2. formats


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "question" in row and "response" in row:
        return "question_response"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise ValueError(
        "unknown format: expected 'messages', 'prompt'+'completion', "
        f"'question'+'response' or 'instruction'+'output'; found keys {sorted(row)}")


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"empty field '{key}'")
    return value


def to_messages(row: dict[str, Any], fmt: str = "auto", require_answer: bool = True
                ) -> list[dict[str, str]]:
    """Turn a row of any supported format into chat messages. Raises ValueError on bad rows.

    `require_answer=False` also accepts a conversation without an assistant turn (a prompt
    to answer, as in evaluation files).
    """
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] is not an object")
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            content = m.get("content")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]: missing or non-string 'content'")
            if role == "assistant" and not content.strip():
                raise ValueError(f"messages[{i}]: empty assistant response")
            out.append({"role": role, "content": content})
    elif fmt == "prompt_completion":
        out = [{"role": "user", "content": _text(row, "prompt")},
               {"role": "assistant", "content": _text(row, "completion")}]
    elif fmt == "question_response":
        out = [{"role": "user", "content": _text(row, "question")},
               {"role": "assistant", "content": _text(row, "response")}]
        if system := _text(row, "system_prompt", required=False).strip():
            out.insert(0, {"role": "system", "content": system})
    elif fmt == "alpaca":
        instruction = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out = [{"role": "user", "content": user},
               {"role": "assistant", "content": _text(row, "output")}]
    else:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if require_answer and not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant turn")
    return out


# ---------------------------------------------------------------- 3. templates


def _end_of_turn(tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise TossError("the tokenizer has no eos token, which the plain template needs")
    return eos


def render(messages: list[dict[str, str]], tokenizer, template: str = "chat"
           ) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return (text, [(start, end) char span of each assistant answer])."""
    if template == "plain":
        return _render_plain(messages, _end_of_turn(tokenizer))
    if template == "chat":
        return _render_chat(messages, tokenizer)
    raise TossError(f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")


def _render_plain(messages, eos: str) -> tuple[str, list[tuple[int, int]]]:
    text, spans, pending_user = "", [], []
    for m in messages:
        if m["role"] == "system":
            text += m["content"].strip() + "\n"
        elif m["role"] == "user":
            pending_user.append(m["content"])
        else:
            if text and not text.endswith("\n"):
                text += "\n"
            text += PLAIN_USER.format(user="\n".join(pending_user))
            pending_user = []
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
    return text, spans


def _apply(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _render_chat(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise TossError("the tokenizer has no chat template; use --template plain")
    text = _apply(tokenizer, messages, False)
    eos = getattr(tokenizer, "eos_token", None) or ""
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t]
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        # Where the answer starts: right after the rendered prefix + generation prompt.
        prefix = _apply(tokenizer, messages[:k], True) if k else ""
        if prefix and text.startswith(prefix) and text[len(prefix):].startswith(content):
            start = len(prefix)
        else:  # templates that rewrite earlier turns: find the answer after its own prompt
            start = text.find(content, _after_prompt(text, cursor, messages[:k], tokenizer))
            if start < 0:
                raise ValueError("the chat template changes the assistant text; use --template plain")
        end = start + len(content)
        # The end-of-turn token that follows the answer is a response token (the model must
        # learn to stop), but not the newline the template writes after it.
        for tok in [eos] + specials:
            if tok and text.startswith(tok, end):
                end += len(tok)
                break
        spans.append((start, end))
        cursor = end
    return text, spans


def _after_prompt(text: str, cursor: int, history: list[dict[str, str]], tokenizer) -> int:
    """Where the answer after `history` can start in `text`: past the turn before it and the
    generation prompt, so that a user turn quoting the answer is never taken for it."""
    pos = cursor
    if history and history[-1]["content"]:
        found = text.find(history[-1]["content"], cursor)
        if found >= 0:
            pos = found + len(history[-1]["content"])
    with_prompt, without = _apply(tokenizer, history, True), _apply(tokenizer, history, False)
    if with_prompt.startswith(without) and (marker := with_prompt[len(without):].strip()):
        found = text.find(marker, pos)
        if found < 0:
            raise ValueError("the chat template's generation prompt is not where the answer "
                             "starts; use --template plain")
        pos = found + len(marker)
    return pos


# ---------------------------------------------------------------- 4. tokens


def tokenizer_sha256(tokenizer) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, specials, template."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    body = backend.to_str() if backend is not None and hasattr(backend, "to_str") else json.dumps(
        sorted(hf.get_vocab().items()))
    return sha256_bytes(body + "\0" + str(getattr(tokenizer, "chat_template", "") or ""))


def encode(text: str, spans: list[tuple[int, int]], tokenizer, template: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize prompt and response segments separately; response segments become the mask.

    Segment by segment, because that is what the model sees at inference: the
    prompt ends where the generation starts. Tokenizing the whole text at once
    would let BPE merge across the boundary ("Assistant: " + "It" -> " It").
    """
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    if template == "plain":  # the chat template writes its own BOS; plain relies on the tokenizer's
        ids += _leading_specials(hf)
        mask += [False] * len(ids)
    cursor = 0
    for start, end in spans + [(len(text), len(text))]:
        for segment, is_response in ((text[cursor:start], False), (text[start:end], True)):
            if segment:
                seg_ids = hf(segment, add_special_tokens=False)["input_ids"]
                ids += seg_ids
                mask += [is_response] * len(seg_ids)
        cursor = end
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def _leading_specials(hf) -> list[int]:
    """The tokens (e.g. BOS) the tokenizer adds in front of a text, if any."""
    with_specials = hf("a", add_special_tokens=True)["input_ids"]
    plain = hf("a", add_special_tokens=False)["input_ids"]
    n = len(with_specials) - len(plain)
    return list(with_specials[:n]) if n > 0 and with_specials[n:n + len(plain)] == plain else []


def tokenize_dataset(path: str | os.PathLike, tokenizer, template: str = "chat",
                     max_seq_len: int = 2048, fmt: str = "auto",
                     skip_bad_rows: bool = False) -> TokenizedData:
    """Read a data file and return its samples with response masks and fingerprints."""
    if template not in TEMPLATES:
        raise TossError(f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")
    if max_seq_len < 2:
        raise TossError(f"max_seq_len must be at least 2, got {max_seq_len}")
    source = str(path)
    skipped: list[tuple[int, str]] = []
    rows = read_rows(path, skip_bad_rows, skipped)
    samples, truncated = [], 0
    limit = max_row_chars(max_seq_len)
    for row in rows:
        try:
            text, spans = render(to_messages(row.data, fmt), tokenizer, template)
            if len(text) > limit:  # before tokenizing: a 21 MB row would take a minute and GBs
                raise ValueError(f"row is {len(text):,} characters; rows over {limit:,} "
                                 f"(MAX_ROW_CHARS, or {CHARS_PER_TOKEN} per token of max_seq_len) "
                                 "are refused: cut the text")
            tokens, mask = encode(text, spans, tokenizer, template)
            if not mask.any():
                raise ValueError("the response has no tokens")
        except ValueError as e:
            _bad(source, row.index + 1, str(e), skip_bad_rows, skipped)
            continue
        cut = len(tokens) > max_seq_len
        if cut:
            truncated += 1
            tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
        samples.append(Sample(row.index, tokens, mask, cut))
    if not samples:
        raise TossError(f"{source}: no usable rows")
    if not any(s.response_mask.any() for s in samples):
        raise TossError(f"{source}: no response token within the first {max_seq_len} tokens of "
                        "any sample (the prompts fill them); raise --max-seq-len")
    p = Path(path)
    fingerprint = {
        "dataset_sha256": sha256_file(p) if p.exists() else sha256_bytes(source),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "template": template,
        "max_seq_len": int(max_seq_len),
    }
    no_response = sum(not s.response_mask.any() for s in samples)
    return TokenizedData(samples, fingerprint, source, truncated, skipped, no_response)


def check_fingerprint(expected: dict[str, Any], found: dict[str, Any], what: str) -> None:
    """Refuse to apply scores/masks made for other data, tokenizer, template or length."""
    problems = []
    for key in ("dataset_sha256", "tokenizer_sha256", "template", "max_seq_len"):
        want, got = str(expected.get(key)), str(found.get(key))
        if want != got:
            problems.append(f"{key}: {what} has {got[:16]}, the data has {want[:16]}")
    if problems:
        raise TossError(f"{what} was made for other data or settings:\n  " + "\n  ".join(problems))
