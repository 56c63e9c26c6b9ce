"""Reasoning (`data.reasoning`), per-turn flags and NeMo RL's loss mask on template fixtures.

Templates: Qwen3 (thinking on and off), gpt-oss harmony, DeepSeek-R1, Llama 3. Every
token sequence is compared with the template rendered by transformers
(`apply_chat_template`), and the default mask with the `{% generation %}` markers the
fixtures carry (transformers' assistant mask) as a cross-check.
"""

from __future__ import annotations

import pytest
from conftest import A1, Q1, Q2, make_tokenizer, trained_runs
from test_data_template_families import make_tokenizer as make_family
from transformers.utils.chat_template_utils import render_jinja_template

from sftkit.data.errors import DataError
from sftkit.data.processor import Processor, ProcessorSettings

THINK = "Let me think step by step"
ANSWER = "The answer is 42."


def _proc(tok, **kw) -> Processor:
    kw.setdefault("add_bos", False)
    kw.setdefault("add_eos", False)
    return Processor(tok, ProcessorSettings(max_length=4096, **kw))


def _trained(tok, ids, mask) -> list[str]:
    return [tok.decode(run) for run in trained_runs(ids, mask)]


def _same_ids(tok, proc, messages, **template_kw) -> tuple[list[int], list[int]]:
    ids, mask, text = proc.encode({"messages": messages})
    expected = tok.apply_chat_template(messages, tokenize=False, **template_kw)
    assert text == expected
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    return ids, mask


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_template_think_block_never_trained(thinking: bool) -> None:
    tok = make_tokenizer("qwen3")
    proc = _proc(tok, template_kwargs={"enable_thinking": thinking})
    messages = [Q1, A1, Q2, {"role": "assistant", "content": ANSWER}]
    ids, mask = _same_ids(tok, proc, messages, enable_thinking=thinking)
    assert "<think>\n\n</think>" in tok.decode(ids)  # the template wrote an empty block
    assert _trained(tok, ids, mask) == [A1["content"] + "<|im_end|>", ANSWER + "<|im_end|>"]


def _agent_row() -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"x": 1}}}
    return [
        Q1,
        {"role": "assistant", "content": "", "reasoning_content": "I need a tool",
         "tool_calls": [call]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": f"<think>{THINK}</think>{ANSWER}"},
    ]  # fmt: skip


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_reasoning_train_mask_drop(thinking: bool) -> None:
    tok = make_tokenizer("qwen3")
    kw = {"template_kwargs": {"enable_thinking": thinking}}
    messages = _agent_row()
    ids, mask = _same_ids(tok, _proc(tok, **kw), messages, enable_thinking=thinking)
    runs = _trained(tok, ids, mask)
    assert "I need a tool" in runs[0] and THINK in runs[1] and ANSWER in runs[1]
    assert all(run.startswith("<think>\n") for run in runs)  # the opener is trained too
    record = _proc(tok, reasoning="mask", **kw).explain({"messages": messages})
    runs = _trained(tok, record["input_ids"], record["loss_mask"])
    assert runs[0].startswith("<tool_call>") and runs[1] == ANSWER + "<|im_end|>"
    reasoning = tok.decode([i for i, r in zip(ids, record["reasoning_mask"], strict=True) if r])
    assert "I need a tool" in reasoning and THINK in reasoning and ANSWER not in reasoning
    dropped = _proc(tok, reasoning="drop_history", **kw)
    ids, mask, text = dropped.encode({"messages": messages})
    assert "I need a tool" not in text and THINK in text
    assert text == tok.apply_chat_template(
        [{**m, "reasoning_content": None} if k == 1 else m for k, m in enumerate(messages)],
        tokenize=False,
        enable_thinking=thinking,
    )


def test_harmony_reasoning_masked_answer_trained() -> None:
    tok = make_family("harmony")
    messages = [Q1, {"role": "assistant", "content": ANSWER, "thinking": THINK}]
    record = _proc(tok, reasoning="mask").explain({"messages": messages})
    assert record["text"] == tok.apply_chat_template(messages, tokenize=False)
    assert _trained(tok, record["input_ids"], record["loss_mask"]) == [ANSWER + "<|return|>"]
    trained = _trained(tok, *_proc(tok).encode({"messages": messages})[:2])
    assert THINK in trained[0] and trained[0].endswith(ANSWER + "<|return|>")


@pytest.mark.parametrize("family", ["llama3", "deepseek_r1"])
def test_inline_think_in_content(family: str) -> None:
    tok = make_tokenizer(family) if family == "llama3" else make_family(family)
    eot = "<|eot_id|>" if family == "llama3" else "<｜end▁of▁sentence｜>"
    messages = [Q1, {"role": "assistant", "content": f"<think>{THINK}</think>{ANSWER}"}]
    for mode in ("train", "mask"):
        ids, mask = _same_ids(tok, _proc(tok, reasoning=mode), messages)
        runs = _trained(tok, ids, mask)
        if family == "deepseek_r1" or mode == "mask":  # R1 drops the reasoning itself
            assert runs == [ANSWER + eot]
        else:
            assert runs == [f"<think>{THINK}</think>{ANSWER}{eot}"]


def test_dropped_reasoning_is_never_found_inside_the_answer() -> None:
    tok = make_family("deepseek_r1")  # drops reasoning; "42" also occurs in the answer
    messages = [Q1, {"role": "assistant", "content": ANSWER, "reasoning_content": "42"}]
    record = _proc(tok, reasoning="mask").explain({"messages": messages})
    assert _trained(tok, record["input_ids"], record["loss_mask"]) == [
        ANSWER + "<｜end▁of▁sentence｜>"
    ]
    assert not any(record["reasoning_mask"])


@pytest.mark.parametrize("family", ["qwen3", "harmony", "deepseek_r1", "llama3"])
def test_default_mask_matches_generation_markers(family: str) -> None:
    tok = make_tokenizer(family) if family in ("qwen3", "llama3") else make_family(family)
    messages = [Q1, A1, Q2, {"role": "assistant", "content": ANSWER, "reasoning_content": THINK}]
    ids, mask, text = _proc(tok).encode({"messages": messages})
    variables = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    rendered, spans = render_jinja_template(
        [messages], chat_template=tok.chat_template, return_assistant_tokens_mask=True, **variables
    )
    assert rendered[0] == text
    expected = [
        tok.decode(tok(text[s:e], add_special_tokens=False)["input_ids"]) for s, e in spans[0]
    ]
    assert _trained(tok, ids, mask) == expected


def test_per_turn_flags_and_roles() -> None:
    tok = make_tokenizer("qwen25")
    a2 = {"role": "assistant", "content": ANSWER}
    row = {"messages": [Q1, {**A1, "train": False}, Q2, a2]}
    ids, mask, _ = _proc(tok).encode(row)
    assert _trained(tok, ids, mask) == [ANSWER + "<|im_end|>"]
    row = {"messages": [Q1, A1, {**Q2, "train": True}, a2], "_train": {"roles": ["assistant"]}}
    ids, mask, _ = _proc(tok).encode(row)
    assert _trained(tok, ids, mask)[1] == Q2["content"]
    row = {"messages": [Q1, A1, Q2, a2], "_train": {"roles": ["user"]}}
    ids, mask, _ = _proc(tok).encode(row)
    assert _trained(tok, ids, mask) == [Q1["content"], Q2["content"]]
    ids, mask, _ = _proc(tok, only_unmask_final=True).encode({"messages": [Q1, A1, Q2, a2]})
    assert _trained(tok, ids, mask) == [ANSWER + "<|im_end|>"]
    with pytest.raises(DataError, match="message 1.*'train' must be true or false"):
        _proc(tok).encode({"messages": [Q1, {**A1, "train": "no"}]})


def test_tool_call_turns_only_and_untrained_rows_counted() -> None:
    tok = make_tokenizer("qwen3")
    rules = {"roles": ["assistant"], "tool_calls_only": True}
    ids, mask, _ = _proc(tok).encode({"messages": _agent_row(), "_train": rules})
    runs = _trained(tok, ids, mask)
    assert len(runs) == 1 and "<tool_call>" in runs[0] and ANSWER not in runs[0]
    proc = _proc(tok)
    plain = [Q1, {**A1, "train": False}]
    result = proc.process_batch([{"messages": plain}, {"messages": [Q1, A1]}], ["r0", "r1"])
    assert result.drops.tolist() == [2, 0]  # untrainable: counted, not an error
    assert proc.process({"messages": plain}, "t").dropped == "untrainable"


# -- NeMo RL's mask -------------------------------------------------------------------------
def _nemo_reference(
    tok, messages, add_generation_prompt, add_bos=True, add_eos=True, only_unmask_final=False
):
    """NeMo RL's `get_formatted_message_log` + `add_loss_mask_to_message_log` (7ea279ab)."""
    prev, ids, mask = "", [], []
    for i, message in enumerate(messages):
        text = tok.apply_chat_template(
            messages[: i + 1],
            tokenize=False,
            add_generation_prompt=add_generation_prompt and message["role"] in ("user", "tool"),
        )
        start = next(
            (k for k, (a, b) in enumerate(zip(prev, text, strict=False)) if a != b),
            min(len(prev), len(text)),
        )
        chunk = text[start:]
        if i == 0 and add_bos and tok.bos_token and not chunk.startswith(tok.bos_token):
            chunk = tok.bos_token + chunk
        if i == len(messages) - 1 and add_eos and not chunk.rstrip("\n").endswith(tok.eos_token):
            chunk += tok.eos_token
        chunk_ids = tok(chunk, add_special_tokens=False)["input_ids"]
        ids += chunk_ids
        last = i == len(messages) - 1
        trained = last if only_unmask_final else message["role"] == "assistant"
        mask += [int(trained)] * len(chunk_ids)
        prev = text
    return ids, mask


@pytest.mark.parametrize("family", ["qwen25", "llama3"])
@pytest.mark.parametrize("agp", [False, True])
def test_nemo_rl_mask_token_for_token(family: str, agp: bool) -> None:
    tok = make_tokenizer(family)
    messages = [Q1, A1, Q2, {"role": "assistant", "content": ANSWER}]
    proc = _proc(tok, add_bos=True, add_eos=True, loss_mask="nemo_rl", add_generation_prompt=agp)
    ids, mask, _ = proc.encode({"messages": messages})
    assert (ids, mask) == _nemo_reference(tok, messages, agp)
    header = "<|im_start|>assistant\n" if family == "qwen25" else "assistant<|end_header_id|>"
    assert (header in "".join(_trained(tok, ids, mask))) is not agp
    batch = proc.process_batch([{"messages": messages}], ["r0"])
    assert (batch.ids.tolist(), batch.mask.tolist()) == (ids, mask)
    final = _proc(tok, add_bos=True, add_eos=True, loss_mask="nemo_rl", add_generation_prompt=agp,
                  only_unmask_final=True)  # fmt: skip
    got = final.encode({"messages": messages})[:2]
    assert got == _nemo_reference(tok, messages, agp, only_unmask_final=True)


@pytest.mark.parametrize("agp", [False, True])
def test_nemo_rl_mask_with_tool_turns(agp: bool) -> None:
    tok = make_tokenizer("qwen25")
    messages = _agent_row()
    proc = _proc(tok, add_bos=True, add_eos=True, loss_mask="nemo_rl", add_generation_prompt=agp)
    assert proc.encode({"messages": messages})[:2] == _nemo_reference(tok, messages, agp)


def test_nemo_rl_mask_without_duplicated_history() -> None:
    tok = make_tokenizer("qwen3")
    messages = [
        Q1,
        {**A1, "reasoning_content": THINK},
        Q2,
        {"role": "assistant", "content": ANSWER},
    ]
    ref_ids, _ = _nemo_reference(tok, messages, True, add_bos=False)
    ids, mask, _ = _proc(tok, add_eos=True, loss_mask="nemo_rl", add_generation_prompt=True).encode(
        {"messages": messages}
    )
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == full  # every chunk a piece of the final rendering
    assert len(ref_ids) > len(ids)  # NeMo RL repeats the first answer (RL#2821)
    assert _trained(tok, ids, mask)[0] == A1["content"] + "<|im_end|>\n"


def test_preview_shows_reasoning_in_its_own_colour() -> None:
    from sftkit.data.preview import REASONING_OFF, REASONING_ON, render_highlighted

    tok = make_tokenizer("qwen3")
    messages = [Q1, {"role": "assistant", "content": ANSWER, "reasoning_content": THINK}]
    for mode, mark in (("train", ("{{", "}}")), ("mask", ("((", "))"))):
        record = _proc(tok, reasoning=mode).explain({"messages": messages})
        plain = render_highlighted(record, tok, color=False)
        assert f"{mark[0]}{THINK}{mark[1]}" in plain and f"{ANSWER}<|im_end|>]]" in plain
        assert (f"[[{ANSWER}" in plain) is (mode == "mask")
        coloured = render_highlighted(record, tok, color=True)
        assert (REASONING_ON if mode == "train" else REASONING_OFF) + THINK in coloured


def test_dataset_rules_and_switches_through_prepare_data(tmp_path) -> None:
    import json

    from sftkit.config.derive import derive_config
    from sftkit.config.schema import MasterConfig
    from sftkit.data import prepare_data

    path = tmp_path / "agent.jsonl"
    rows = [{"messages": _agent_row()}, {"messages": [Q1, {**A1, "train": False}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = MasterConfig()
    cfg.data.train = {"dataset_name": "openai_format", "data_path": str(path),
                      "train_tool_calls_only": True}  # fmt: skip
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.reasoning = "mask"
    cfg = derive_config(cfg)  # derived and checked as load_config does
    tok = make_tokenizer("qwen3")
    data = prepare_data(cfg, tok)
    assert data.report["train/dropped_untrainable"] == 1 and len(data.train) == 1
    example = data.train[0]
    trained = _trained(tok, list(example.input_ids), list(example.loss_mask))
    assert len(trained) == 1 and trained[0].startswith("<tool_call>")  # reasoning masked
    cfg.data.train = {**cfg.data.train, "roles_to_train": ["robot"]}
    with pytest.raises(ValueError, match="roles_to_train=\\['robot'\\]"):
        prepare_data(cfg, tok)


def test_flags_follow_their_messages_when_the_system_is_folded() -> None:
    tok = make_tokenizer("gemma_strict")  # rejects a system role: it is folded into the user
    system = {"role": "system", "content": "Be brief."}
    row = {
        "messages": [
            system,
            Q1,
            {**A1, "train": False},
            Q2,
            {"role": "assistant", "content": ANSWER},
        ]
    }
    ids, mask, text = _proc(tok).encode(row)
    assert "Be brief." in text
    assert _trained(tok, ids, mask) == [ANSWER + "<end_of_turn>"]


def test_nemo_rl_mask_renders_prefixes_with_the_adapted_tools() -> None:
    from test_data_template_families import SEED_TOOLS

    tok = make_family("hermes")  # reads tool.function: the flat tools are adapted
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "P"}}}
    row = {"messages": [Q1, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "22"}, {"role": "assistant", "content": ANSWER}],
           "tools": SEED_TOOLS}  # fmt: skip
    sftkit_text = _proc(tok).encode(row)[2]
    ids, mask, text = _proc(tok, loss_mask="nemo_rl").encode(row)
    assert text == sftkit_text and "get_weather" in text
    assert any(mask)
