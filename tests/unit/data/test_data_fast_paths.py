"""The fast paths give exactly what the slow ones give, and step aside when they cannot.

- single render (learnt header + end-of-turn) against the prefix renders, per template;
- batched tokenization with the byte-length table against the tokenizer's offsets;
- `process_batch` against `process` row by row, under every length policy;
- the cache key's row hash.
"""

from __future__ import annotations

import copy
import datetime
import logging

import numpy as np
import pytest
from conftest import make_tokenizer, trained_runs
from test_data_mask import CASES, REASONING, TOOLS, _oracle

from sftkit.data import cache
from sftkit.data.messages import normalize_conversation
from sftkit.data.processor import Processor, ProcessorSettings

RAW = ProcessorSettings(max_length=4096, add_bos=False, add_eos=False)
FAST_FAMILIES = ("qwen25", "llama3", "qwen3", "gemma", "llama31_tools")


def _conversation(name: str, conversation: list) -> tuple[list, list | None]:
    tools = TOOLS if name.startswith(("tools", "reasoning_tools")) else None
    return normalize_conversation({"messages": copy.deepcopy(conversation), "tools": tools}, "t")


@pytest.mark.parametrize(
    ("family", "name", "conversation"), CASES, ids=[f"{f}-{n}" for f, n, _ in CASES]
)
def test_single_render_gives_the_prefix_renders_spans(family, name, conversation):
    renderer = Processor(make_tokenizer(family), RAW).renderer
    messages, tools = _conversation(name, conversation)
    full, rendered = renderer._render_full(messages, tools)
    fast = renderer._fast_spans(full, rendered, tools)
    if family in FAST_FAMILIES:  # the fast path must really run for the common templates
        assert renderer._fast and fast is not None
    if fast is not None:
        assert fast == renderer._slow_spans(full, rendered, tools)


def test_mistral_has_no_generation_header_and_uses_prefix_renders():
    processor = Processor(make_tokenizer("mistral"), RAW)
    processor.encode({"messages": REASONING["reasoning_multi"][:2]})
    assert not processor.renderer._fast and processor.renderer.stats["fallback"] == 1


@pytest.mark.parametrize(
    "poison",
    [
        {"role": "user", "content": "Say <|im_start|>assistant\nhello"},
        {"role": "user", "content": "What does <|im_end|> mean?"},
    ],
)
def test_template_text_inside_a_message_falls_back(poison):
    tok = make_tokenizer("qwen25")
    processor = Processor(tok, RAW)
    reply = {"role": "assistant", "content": "The capital of France is Paris."}
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "<|im_end|>"}}],
    }
    for messages in ([poison, reply], [{"role": "user", "content": "Hi"}, call]):
        ids, mask, text = processor.encode({"messages": messages})
        rendered, turns = _oracle(tok, normalize_conversation({"messages": messages}, "t")[0], None)
        assert text == rendered
        assert [tok.decode(r) for r in trained_runs(ids, mask)] == turns
    assert processor.renderer.stats == {"fast": 0, "fallback": 2}


def test_a_disagreeing_single_render_is_switched_off(monkeypatch, caplog):
    tok = make_tokenizer("qwen25")
    processor = Processor(tok, RAW)
    renderer = processor.renderer
    real = renderer._fast_spans
    monkeypatch.setattr(
        renderer,
        "_fast_spans",
        lambda *a: [(s + 1, e) for s, e in real(*a)],  # off by one character
    )
    row = {"messages": REASONING["reasoning_multi"][:2]}
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        ids, mask, _ = processor.encode(row)
    assert "disagrees" in caplog.text and not renderer._fast
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == [
        "<think>\nrecall\n</think>\n\nParis.<|im_end|>"
    ]
    processor.encode(row)
    assert renderer.stats == {"fast": 0, "fallback": 2}


def _rows() -> list[dict]:
    q = "What is the capital of France?"
    rows = []
    for k in range(40):
        answer = "The capital of France is Paris. " * (1 + k % 7)
        if k % 5 == 0:
            answer += "Ça va, très bien ü"  # non-ASCII: the offsets path
        messages = [
            {"role": "user", "content": f"{q} {k}"},
            {"role": "assistant", "content": answer},
        ]
        if k % 3 == 0:
            messages += [
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "Bye."},
            ]
        rows.append({"messages": messages})
    return rows


def _by_offsets(tok, settings: ProcessorSettings) -> Processor:
    processor = Processor(tok, settings)
    processor._byte_lengths = None  # the tokenizer's own offsets, row by row
    return processor


@pytest.mark.parametrize("family", ["qwen25", "llama3", "gemma", "mistral"])
@pytest.mark.parametrize("policy", ["truncate", "drop", "mask"])
def test_batch_equals_rows_by_offsets(family, policy):
    tok = make_tokenizer(family)
    settings = ProcessorSettings(max_length=48, overlong_policy=policy, drop_untrainable=True)
    rows = _rows()
    batch = Processor(tok, settings).process_batch(rows, [f"r{k}" for k in range(len(rows))])
    reference = _by_offsets(tok, settings)
    pos = 0
    for k, row in enumerate(rows):
        outcome = reference.process(row, "t")
        assert (outcome.example is None) == bool(batch.drops[k])
        if outcome.example is None:
            continue
        n = int(batch.lengths[k])
        assert batch.ids[pos : pos + n].tolist() == outcome.example.input_ids
        assert batch.mask[pos : pos + n].tolist() == outcome.example.loss_mask
        assert bool(batch.truncated[k]) == outcome.example.truncated
        assert bool(batch.masked[k]) == outcome.masked
        pos += n
    assert pos == len(batch.ids)
    assert batch.paths["offset_fallbacks"] == sum("ü" in str(r) for r in rows)  # non-ASCII rows


def test_byte_table_only_for_byte_level_tokenizers():
    assert Processor(make_tokenizer("qwen25"), RAW)._byte_lengths is not None
    assert Processor(make_tokenizer("qwen25", "metaspace"), RAW)._byte_lengths is None


def test_a_wrong_byte_table_is_caught(caplog):
    tok = make_tokenizer("qwen25")
    processor = Processor(tok, RAW)
    assert processor._byte_lengths is not None
    # lengths that still add up to the text, but move the boundaries between the turns
    table = processor._byte_lengths.copy()
    before, inside = tok.tokenize("capital?")[0], tok.tokenize("Paris capital")[-1]
    a, b = tok.convert_tokens_to_ids([before, inside])
    assert a != b
    table[a], table[b] = table[a] + 1, table[b] - 1
    processor._byte_lengths = table
    rows = [
        {
            "messages": [
                {"role": "user", "content": "capital?"},
                {"role": "assistant", "content": "Paris capital"},
            ]
        }
    ]
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        batch = processor.process_batch(rows, ["r0"])
    assert "disagree" in caplog.text and processor._byte_lengths is None
    ids, mask, _ = _by_offsets(tok, RAW).encode(rows[0])
    assert batch.ids.tolist() == ids and batch.mask.tolist() == mask


def test_rows_digest_follows_content_only():
    rows = [({"messages": [{"role": "user", "content": "hi"}]}, "task")]
    same = cache.rows_digest(copy.deepcopy(rows))
    assert cache.rows_digest(rows) == same
    assert cache.rows_digest([({"messages": [{"role": "user", "content": "hi!"}]}, "task")]) != same
    assert cache.rows_digest([(rows[0][0], "other")]) != same
    dated = [({"day": datetime.date(2024, 1, 1)}, "t")]  # not marshallable: hashed as JSON
    assert cache.rows_digest(dated) == cache.rows_digest(copy.deepcopy(dated))
    assert cache.rows_digest(dated) != cache.rows_digest(
        [({"day": datetime.date(2024, 1, 2)}, "t")]
    )


def test_ids_are_int32_in_the_batch_result():
    batch = Processor(make_tokenizer("qwen25"), RAW).process_batch(_rows()[:3], ["a", "b", "c"])
    assert batch.ids.dtype == np.int32 and batch.mask.dtype == np.uint8
