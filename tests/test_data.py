"""Data layer: formats, templates, exact response masks, truncation, bad input."""

import json

import numpy as np
import pytest

from toss_mlx.data import (
    check_fingerprint,
    read_rows,
    render,
    to_messages,
    tokenize_dataset,
)
from toss_mlx.io import TossError

EOS = "<|im_end|>"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "It is 4, of course."},
]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def masked_text(sample, tokenizer):
    return tokenizer.decode(sample.tokens[sample.response_mask].tolist())


def spans_of(mask):
    """Contiguous runs of True: [(start, end), ...]."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_multi_turn_mask_covers_every_assistant_turn_exactly(tmp_path, tokenizer, template):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    data = tokenize_dataset(f, tokenizer, template=template)
    s = data.samples[0]
    runs = spans_of(s.response_mask)
    assert len(runs) == 2  # one run per assistant turn, nothing else
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    for (a, b), answer in zip(runs, answers, strict=True):
        assert tokenizer.decode(s.tokens[a:b].tolist()) == answer + EOS
    # Everything outside the runs decodes to the rest of the rendered text: no token is lost.
    text, _ = render(CONVERSATION, tokenizer, template)
    assert tokenizer.decode(s.tokens.tolist()) == text


def test_chat_template_mask_independent_of_incremental_tokenization(tmp_path, tokenizer):
    """The offset-based mask equals one built by tokenizing the rendered prefixes one by one."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    s = tokenize_dataset(f, tokenizer).samples[0]
    hf = tokenizer._tokenizer
    expected = []
    for k, m in enumerate(CONVERSATION):
        if m["role"] != "assistant":
            continue
        prefix = hf.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=True)
        n_prefix = len(hf(prefix, add_special_tokens=False)["input_ids"])
        n_answer = len(hf(prefix + m["content"] + EOS, add_special_tokens=False)["input_ids"])
        expected.append((n_prefix, n_answer))
    assert [tuple(map(int, r)) for r in spans_of(s.response_mask)] == expected


class _CountingTemplate:
    """A chat template that rewrites earlier turns (its header counts the messages), so the
    renderer must search for each answer; the user quotes the answer word for word."""

    chat_template = "counting"
    eos_token = EOS
    all_special_tokens = [EOS]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = f"{len(messages)} turns\n" + "".join(
            f"<|im_start|>{m['role']}\n{m['content']}{EOS}\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_answer_is_found_after_its_prompt_not_in_a_quoting_user_turn():
    messages = [{"role": "user", "content": "Repeat after me: Paris is nice."},
                {"role": "assistant", "content": "Paris is nice."}]
    text, spans = render(messages, _CountingTemplate(), "chat")
    (start, end), = spans
    assert text[start:end] == "Paris is nice." + EOS
    assert text[:start].endswith("<|im_start|>assistant\n")  # the answer's own turn, not the quote


def test_plain_template_is_the_papers(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, spans = render(msgs, tokenizer, "plain")
    assert text == "Human: Hi\nAssistant: Hello" + EOS
    assert [text[a:b] for a, b in spans] == ["Hello" + EOS]


@pytest.mark.parametrize("row,expected", [
    ({"prompt": "P", "completion": "C"}, [("user", "P"), ("assistant", "C")]),
    ({"question": "Q", "response": "R", "system_prompt": "S"},
     [("system", "S"), ("user", "Q"), ("assistant", "R")]),
    ({"question": "Q", "response": "R", "system_prompt": ""}, [("user", "Q"), ("assistant", "R")]),
    ({"instruction": "I", "input": "X", "output": "O"}, [("user", "I\n\nX"), ("assistant", "O")]),
    ({"instruction": "I", "input": "", "output": "O"}, [("user", "I"), ("assistant", "O")]),
])
def test_formats_detected(row, expected):
    assert [(m["role"], m["content"]) for m in to_messages(row)] == expected


def test_formats_from_every_file_type_keep_row_index(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i}", "completion": f"answer {i}"} for i in range(4)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]) + "\n")
    assert [r.index for r in read_rows(jsonl)] == [0, 2, 3, 4]  # blank line 2 kept in the count
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    assert [r.data for r in read_rows(js)] == rows
    import datasets

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    data = tokenize_dataset(pq, tokenizer)
    assert [s.row_index for s in data.samples] == [0, 1, 2, 3]
    assert masked_text(data.samples[2], tokenizer) == "answer 2" + EOS


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "a", "completion": ', "malformed JSON"),
    ('{"prompt": "a"}', "unknown format"),
    ('{"prompt": "a", "completion": ""}', "empty field 'completion'"),
    ('{"prompt": "a", "completion": 3}', "must be a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}',
     "empty assistant response"),
    ('["not", "an", "object"]', "not a JSON object"),
])
def test_bad_row_names_file_line_and_problem(tmp_path, tokenizer, line, problem):
    good = json.dumps({"prompt": "a", "completion": "b"})
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(TossError) as e:
        tokenize_dataset(f, tokenizer)
    assert "bad.jsonl:3: " in str(e.value) and problem in str(e.value)
    data = tokenize_dataset(f, tokenizer, skip_bad_rows=True)
    assert [s.row_index for s in data.samples] == [0, 1, 3]
    assert [line for line, _ in data.skipped] == [3]
    assert "1 bad rows skipped (lines 3)" in data.summary()


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(TossError, match="not found"):
        tokenize_dataset(tmp_path / "nope.jsonl", tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TossError, match="no rows"):
        tokenize_dataset(tmp_path / "empty.jsonl", tokenizer)
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(TossError, match=r"bad.json:2: malformed JSON"):
        tokenize_dataset(tmp_path / "bad.json", tokenizer)


def test_truncation_counted_and_reported(tmp_path, tokenizer):
    rows = [{"prompt": "hi", "completion": "word " * 50}, {"prompt": "hi", "completion": "ok"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    full = tokenize_dataset(f, tokenizer, max_seq_len=4096)
    cut = tokenize_dataset(f, tokenizer, max_seq_len=24)
    assert cut.truncated == 1 and cut.samples[0].truncated and not cut.samples[1].truncated
    assert len(cut.samples[0].tokens) == 24
    np.testing.assert_array_equal(cut.samples[0].tokens, full.samples[0].tokens[:24])
    np.testing.assert_array_equal(cut.samples[0].response_mask, full.samples[0].response_mask[:24])
    assert "1 truncated at 24 tokens" in cut.summary()


def test_flat_layout_and_fingerprints(tmp_path, tokenizer):
    rows = [{"prompt": "a", "completion": "b c"}, {"prompt": "d e f", "completion": "g"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    data = tokenize_dataset(f, tokenizer)
    flat = data.flat()
    for i, s in enumerate(data.samples):
        a, b = flat["offsets"][i], flat["offsets"][i + 1]
        np.testing.assert_array_equal(flat["token_ids"][a:b], s.tokens)
        np.testing.assert_array_equal(flat["response_mask"][a:b], s.response_mask)
    assert flat["offsets"][-1] == len(flat["token_ids"]) and data.response_tokens == flat["response_mask"].sum()
    check_fingerprint(data.fingerprint, dict(data.fingerprint), "mask.safetensors")
    other = write_jsonl(tmp_path / "o.jsonl", rows[:1])
    for changed in (tokenize_dataset(other, tokenizer).fingerprint,
                    tokenize_dataset(f, tokenizer, template="plain").fingerprint,
                    tokenize_dataset(f, tokenizer, max_seq_len=99).fingerprint):
        with pytest.raises(TossError, match="made for other data"):
            check_fingerprint(data.fingerprint, changed, "mask.safetensors")
