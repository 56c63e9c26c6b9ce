"""The loss mask against an independent oracle, for six template families.

Each fixture template carries `{% generation %}` tags around what must be trained; the
tags do not change the text. transformers' `render_jinja_template` turns them into
character ranges (the oracle), while sftkit ignores them and finds spans its own way.
"""

from __future__ import annotations

import copy

import pytest
from conftest import A1, A2, Q1, Q2, SYSTEM, TOOLS, make_tokenizer, trained_runs
from transformers.utils.chat_template_utils import render_jinja_template

from sftkit.data.messages import normalize_conversation
from sftkit.data.processor import Processor, ProcessorSettings

CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
}
CALL_NESTED = {
    "role": "assistant",
    "content": "Let me compute.",
    "tool_calls": [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": "12+30"}},
        }
    ],
}
RESULT = {"role": "tool", "content": "22 degrees, sunny", "tool_call_id": "c0"}
FINAL = {"role": "assistant", "content": "The weather in Paris is sunny and 22 degrees."}

CONVERSATIONS = {
    "single": [Q1, A1],
    "single_system": [SYSTEM, Q1, A1],
    "multi": [SYSTEM, Q1, A1, Q2, A2],
}
TOOL_CONVERSATIONS = {
    "tools_flat_calls": [SYSTEM, Q1, CALL, RESULT, FINAL],
    "tools_nested_calls": [Q1, CALL_NESTED, {**RESULT, "content": "42"}, A1, Q2, A2],
}
REASONING = {
    "reasoning_multi": [
        Q1,
        {"role": "assistant", "content": "<think>\nrecall\n</think>\n\nParis."},
        Q2,
        {"role": "assistant", "content": "Goodbye!", "reasoning_content": "be polite"},
    ],
    "reasoning_tools_then_query": [
        Q1,
        {**CALL, "reasoning_content": "need weather"},
        RESULT,
        {**FINAL, "reasoning_content": "answer now"},
        Q2,
        A2,
    ],
}
CASES = [
    (f, name, conv)
    for f in ("qwen25", "llama3", "qwen3", "gemma", "mistral", "llama31_tools")
    for name, conv in CONVERSATIONS.items()
]
CASES += [
    (f, name, conv)
    for f in ("qwen25", "qwen3", "llama31_tools")
    for name, conv in TOOL_CONVERSATIONS.items()
]
CASES += [("qwen3", name, conv) for name, conv in REASONING.items()]


def _oracle(tok, messages, tools) -> tuple[str, list[str]]:
    variables = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    rendered, indices = render_jinja_template(
        [messages],
        tools=tools,
        chat_template=tok.chat_template,
        return_assistant_tokens_mask=True,
        **variables,
    )
    turns = [rendered[0][s:e] for s, e in indices[0]]
    # the empty think block Qwen3 writes before a last reply without reasoning is the
    # template's text, never trained (issue 23); the fixture's markers include it
    empty = "<think>\n\n</think>\n\n"
    return rendered[0], [t[len(empty) :] if t.startswith(empty) else t for t in turns]


@pytest.mark.parametrize(
    ("family", "name", "conversation"), CASES, ids=[f"{f}-{n}" for f, n, _ in CASES]
)
@pytest.mark.parametrize("kind", ["byte", "metaspace"])
def test_trained_tokens_are_exactly_the_assistant_turns(family, name, conversation, kind):
    tok = make_tokenizer(family, kind)
    tools = TOOLS if name.startswith(("tools", "reasoning_tools")) else None
    row = {"messages": copy.deepcopy(conversation), "tools": tools}
    processor = Processor(tok, ProcessorSettings(max_length=4096, add_bos=False, add_eos=False))
    ids, mask, text = processor.encode(row)
    _, _, rendered_messages = processor.renderer.render_spans(*normalize_conversation(row, "t"))
    expected_text, expected_turns = _oracle(tok, rendered_messages, tools)

    assert text == expected_text
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(expected_turns) == sum(m["role"] == "assistant" for m in rendered_messages)
    if kind == "byte":
        assert [tok.decode(r) for r in trained_runs(ids, mask)] == expected_turns
    else:  # Metaspace decoding drops word-initial spaces; compare covered characters instead
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        covered = []
        for k, m in enumerate(mask):
            if m and (k == 0 or not mask[k - 1]):
                covered.append([offsets[k][0], offsets[k][1]])
            elif m:
                covered[-1][1] = offsets[k][1]
        got = [text[s:e].lstrip(" ") for s, e in covered]
        assert got == [t.lstrip(" ") for t in expected_turns]
    assert "None" not in "".join(expected_turns)


def test_history_rewriting_is_not_duplicated():
    """Qwen3 drops the first turn's <think>; its reasoning must appear nowhere (NeMo #2821)."""
    tok = make_tokenizer("qwen3")
    processor = Processor(tok, ProcessorSettings(max_length=4096, add_bos=False, add_eos=False))
    ids, mask, text = processor.encode({"messages": REASONING["reasoning_multi"]})
    assert "recall" not in text and text.count("Paris.") == 1
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == [
        "Paris.<|im_end|>",
        "<think>\nbe polite\n</think>\n\nGoodbye!<|im_end|>",
    ]


def test_only_unmask_final_and_enable_thinking_header():
    tok = make_tokenizer("qwen3")
    settings = ProcessorSettings(
        max_length=4096,
        add_bos=False,
        add_eos=False,
        only_unmask_final=True,
        template_kwargs={"enable_thinking": False},
    )
    ids, mask, _ = Processor(tok, settings).encode({"messages": CONVERSATIONS["multi"]})
    # with thinking off the empty <think></think> is part of the generation prompt: untrained
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == [
        "Hello! How can I help you today?<|im_end|>"
    ]


def test_template_rejecting_system_does_not_crash():
    tok = make_tokenizer("gemma_strict")
    processor = Processor(tok, ProcessorSettings(max_length=4096, add_bos=False, add_eos=False))
    ids, mask, text = processor.encode({"messages": CONVERSATIONS["multi"]})
    assert text.startswith("<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is")
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == [
        "The capital of France is Paris.<end_of_turn>",
        "Hello! How can I help you today?<end_of_turn>",
    ]


def test_metaspace_has_no_spurious_spaces():
    """Per-chunk tokenization (NeMo #2844) adds '▁' at each chunk start; one pass does not."""
    tok = make_tokenizer("llama3", "metaspace")
    processor = Processor(tok, ProcessorSettings(max_length=4096, add_bos=False, add_eos=False))
    ids, _, text = processor.encode({"messages": CONVERSATIONS["multi"]})
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
