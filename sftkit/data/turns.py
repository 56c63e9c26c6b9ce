"""Which parts of a rendered conversation are trained: per-turn flags, roles and reasoning.

The span finder (`sftkit.data.templates`) gives one character span per assistant message;
this module chooses among them and trims them:

- per message, `train: true/false` overrides the default for that message; the default is
  the dataset's `roles_to_train` (assistant), narrowed by `train_tool_calls_only` (only
  assistant turns that call a tool) or by `sft.only_unmask_final` (only the last one);
- reasoning (`reasoning_content` / `thinking` / `reasoning`, or a `<think>...</think>`
  block leading the content) is trained (`data.reasoning: train`), masked with the answer
  trained (`mask`), or removed from every assistant turn but the last before rendering
  (`drop_history`);
- text the template inserts itself is never trained: Qwen3 writes an empty
  `<think>\\n\\n</think>\\n\\n` before the last reply when the row has no reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftkit.data.errors import DataError
from sftkit.data.messages import REASONING_FIELDS, Messages

Span = tuple[int, int]
REASONING_MODES = ("train", "mask", "drop_history")
LOSS_MASKS = ("sftkit", "nemo_rl")
TRAIN_KEY = "_train"  # per row, from the dataset entry: {"roles": [...], "tool_calls_only": b}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TRAINABLE_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


def message_flags(row: dict[str, Any], where: str) -> list[bool | None]:
    """Each message's `train` flag (None: the default applies)."""
    flags: list[bool | None] = []
    for k, message in enumerate(row.get("messages") or ()):
        value = message.get("train") if isinstance(message, dict) else None
        if value is not None and not isinstance(value, bool):
            raise DataError(
                f"{where} message {k}",
                f"'train' must be true or false, got {value!r}.",
                "write train: true (train this message) or train: false (never train it).",
            )
        flags.append(value)
    return flags


def row_rules(row: dict[str, Any]) -> tuple[frozenset[str], bool]:
    """`(roles_to_train, tool_calls_only)` of the dataset the row came from."""
    spec = row.get(TRAIN_KEY) or {}
    return frozenset(spec.get("roles") or ("assistant",)), bool(spec.get("tool_calls_only"))


def check_rules(name: str, roles: Any, tool_calls_only: Any) -> dict[str, Any] | None:
    """A dataset entry's `roles_to_train` / `train_tool_calls_only`, checked; None: defaults."""
    if roles is None and not tool_calls_only:
        return None
    if isinstance(roles, str):
        roles = [roles]
    if roles is not None and (
        not isinstance(roles, list) or not roles or any(r not in TRAINABLE_ROLES for r in roles)
    ):
        raise ValueError(
            f"dataset {name}: roles_to_train={roles!r}; use a list of roles from "
            f"{', '.join(TRAINABLE_ROLES)} (default [assistant])."
        )
    if not isinstance(tool_calls_only, (bool, type(None))):
        raise ValueError(
            f"dataset {name}: train_tool_calls_only={tool_calls_only!r}; use true/false."
        )
    rules: dict[str, Any] = {"roles": sorted({r.lower() for r in roles or ["assistant"]})}
    if tool_calls_only:
        rules["tool_calls_only"] = True
    return rules


def final_index(messages: Messages, only_unmask_final: bool, nemo: bool) -> int | None:
    """The one message `only_unmask_final` trains: NeMo RL's last message (whatever its
    role) in `loss_mask: nemo_rl`, else the last assistant turn (sftkit's meaning)."""
    if not only_unmask_final:
        return None
    if nemo:
        return len(messages) - 1
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def selected(
    messages: Messages,
    flags: Sequence[bool | None],
    roles: frozenset[str],
    tool_calls_only: bool,
    final_only: int | None,
) -> list[bool]:
    """Per message, whether it is trained. `final_only`: the one index `only_unmask_final` keeps."""
    out = []
    for i, message in enumerate(messages):
        role = message["role"]
        default = role in roles
        if tool_calls_only and role == "assistant":
            default = bool(message.get("tool_calls"))
        if final_only is not None:
            default = i == final_only
        flag = flags[i] if i < len(flags) else None
        out.append(default if flag is None else flag)
    return out


def reasoning_of(message: dict[str, Any]) -> str:
    """An assistant message's reasoning: its reasoning field, else a leading `<think>` block."""
    for key in REASONING_FIELDS:
        value = message.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    content = message.get("content")
    if isinstance(content, str) and THINK_CLOSE in content:  # split as Qwen3's template does
        return content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1].strip()
    return ""


def answer_of(message: dict[str, Any]) -> str:
    """An assistant message's content without a leading `<think>` block."""
    content = message.get("content")
    if not isinstance(content, str):
        return ""
    return content.split(THINK_CLOSE)[-1].strip() if THINK_CLOSE in content else content.strip()


def without_train_keys(messages: Messages) -> Messages:
    """Messages as the template sees them: sftkit's `train` flag removed."""
    return [{k: v for k, v in m.items() if k != "train"} if "train" in m else m for m in messages]


def drop_history(messages: Messages) -> Messages:
    """Reasoning removed from every assistant message but the last (`data.reasoning: drop_history`)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    out = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i != last and reasoning_of(message):
            message = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
            message["content"] = answer_of(message)
        out.append(message)
    return out


def trained_spans(
    text: str,
    messages: Messages,
    assistant_spans: Sequence[Span],
    chosen: Sequence[bool],
    mode: str,
    inserted: str,
    where: str,
    empty_think_prompt: bool = False,
) -> tuple[list[Span], list[Span]]:
    """`(trained spans, reasoning spans)` in `text`, in order.

    `assistant_spans` holds one span per assistant message (the span finder's); `inserted`
    is the text the template puts before a final reply that has no reasoning (Qwen3's empty
    think block), never trained; `empty_think_prompt`: the generation prompt holds one
    (Qwen3 with thinking off). A chosen non-assistant message trains its content.
    """
    spans: list[Span] = []
    thinking: list[Span] = []
    spans_left = iter(assistant_spans)
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            content = message.get("content")
            content = content.strip() if isinstance(content, str) else ""
            found = text.find(content, pos) if content else -1
            if chosen[i]:
                if found < 0:
                    raise DataError(
                        f"{where} message {i}",
                        f"this {message['role']} message is to be trained, but the chat "
                        "template does not render its content verbatim.",
                        "train only assistant turns for this template (roles_to_train), or set "
                        "train: false on this message.",
                    )
                spans.append((found, found + len(content)))
            if found >= 0:
                pos = found + len(content)
            continue
        start, end = next(spans_left)
        pos = end
        reasoning, answer = reasoning_of(message), answer_of(message)
        # the answer comes last: reasoning is looked for before it, so a reasoning text the
        # template dropped is never found inside the answer ("42" in "The answer is 42")
        a_at = text.rfind(answer, start, end) if answer else -1
        r_at = text.find(reasoning, start, a_at if a_at >= 0 else end) if reasoning else -1
        if r_at >= 0:
            thinking.append((r_at, r_at + len(reasoning)))
        elif not reasoning and inserted and text.startswith(inserted, start):
            start += len(inserted)  # the template's own empty think block
        if not chosen[i]:
            continue
        if empty_think_prompt and r_at >= start > (opener := text.rfind(THINK_OPEN, 0, r_at)):
            # the generation prompt holds an empty think block (Qwen3, thinking off) that this
            # turn's reasoning replaces: its opener belongs to the reasoning. (GLM-4.5's prompt
            # ends with the opener itself: the model continues after it, untrained.)
            if opener >= 0 and not text[opener + len(THINK_OPEN) : r_at].strip():
                start = opener
        if mode == "mask" and r_at >= 0:
            start = a_at if a_at >= 0 else _after_reasoning(text, r_at + len(reasoning), end)
        if end > start:
            spans.append((start, end))
    return spans, thinking


def _after_reasoning(text: str, after: int, end: int) -> int:
    """Where a turn without answer text (a tool call follows) resumes after its reasoning:
    the closing tag and whitespace are not trained."""
    k = after
    while k < end and text[k].isspace():
        k += 1
    if text.startswith(THINK_CLOSE, k):
        k += len(THINK_CLOSE)
    while k < end and text[k].isspace():
        k += 1
    return k
