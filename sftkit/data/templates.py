"""Render a conversation with its chat template and find the trained character spans.

The whole conversation is rendered once (`full`). Each assistant turn's span in `full` runs
from the end of its generation header to the end of its end-of-turn text (trailing
whitespace such as ChatML's newline after `<|im_end|>` is not part of it):

- start: the longest common prefix of `full` and the rendering of the messages before the
  turn with `add_generation_prompt=True`, so the header is never trained;
- end: the length of the rendering that stops after the turn, when that rendering is a
  prefix of `full`.

Templates that rewrite history (Qwen3 and DeepSeek-R1 drop earlier `<think>` blocks) make
those renderings disagree with `full`. Such turns are located in `full` itself by the
template's assistant header and end-of-turn text, which are probed once with sentinel
messages, so no text is ever duplicated (NeMo RL #2821). Only `full` is tokenized.

That costs about two extra renders per assistant turn. Most conversations take a single
render instead (`_fast_spans`): the generation prompt `G` (what `add_generation_prompt`
appends, e.g. `<|im_start|>assistant\n`) and the end-of-turn text are learnt once per
template, and each assistant turn is located in `full` as the first `G` after the previous
message's content, with its own content after `G` and its end-of-turn after that and no
other `G` in between. A conversation that does not fit (content not found, header or
end-of-turn text inside a message, ...) takes the prefix renders above; so does every
conversation of a template whose probe conversations, or first real conversations, do not
give identical spans both ways. `ChatRenderer.stats` counts both paths.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger("sftkit")

Span = tuple[int, int]
VERIFY_FIRST = 8  # conversations per renderer checked against the prefix renders
_USER, _ASSISTANT, _USER2, _ASSISTANT2 = "\ue000", "\ue001", "\ue002", "\ue003"


class TemplateRejected(ValueError):
    """The chat template raised (e.g. `raise_exception('roles must alternate')`)."""


def compile_template(source: str) -> jinja2.Template:
    """Compile in the same sandbox transformers uses (`ImmutableSandboxedEnvironment`)."""
    try:  # transformers' own environment: identical filters, globals and `{% generation %}`
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(source)
    except ImportError:  # pragma: no cover - private helper moved; keep a faithful copy
        return _own_environment().from_string(source)


def _own_environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class Probe:
    """Template facts learnt from sentinel conversations."""

    header: str  # assistant header of an earlier turn, e.g. "<|im_start|>assistant\n"
    last_header: str  # assistant header of the final turn (may hold an empty <think>)
    eot: str  # end-of-turn text after assistant content, e.g. "<|im_end|>"; "" if none
    gen_prompt_len: int  # characters add_generation_prompt appends
    gen_prompt: str = ""  # the text add_generation_prompt appends, e.g. "<|im_start|>assistant\n"


class ChatRenderer:
    """A compiled chat template plus the span finder for assistant turns."""

    def __init__(self, source: str, variables: dict[str, Any] | None = None) -> None:
        self.source = source
        self._template = compile_template(source)
        self._variables = dict(variables or {})
        self.probe = self._probe()
        self._merge_warned = False
        # conversations that took the single render ("fast") or the prefix renders
        self.stats = {"fast": 0, "fallback": 0}
        self._verify_left = VERIFY_FIRST
        self._fast = self._fast_path_agrees_on_probes()

    # -- rendering -------------------------------------------------------------------
    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """Render messages to text; a template error becomes `TemplateRejected`."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._variables,
            )
        except jinja2.exceptions.TemplateError as err:
            raise TemplateRejected(str(err)) from err

    def render_spans(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> tuple[str, list[Span], list[dict[str, Any]]]:
        """Return `(full_text, spans, messages_rendered)`, one span per assistant message.

        A leading system message that the template rejects is folded into the first user
        turn (as Gemma's own templates do) instead of crashing (NeMo RL #2863).
        """
        full, messages = self._render_full(messages, tools)
        spans = self._fast_spans(full, messages, tools) if self._fast else None
        if spans is None:
            self.stats["fallback"] += 1
            return full, self._slow_spans(full, messages, tools), messages
        if self._verify_left > 0:  # the first conversations are checked against the slow path
            self._verify_left -= 1
            slow = self._slow_spans(full, messages, tools)
            if slow != spans:
                logger.warning(
                    "the single-render span finder disagrees with the prefix renders for this "
                    "chat template; using prefix renders for every conversation (slower)"
                )
                self._fast = False
                self.stats["fallback"] += 1
                return full, slow, messages
        self.stats["fast"] += 1
        return full, spans, messages

    def _render_full(
        self, messages: list[dict[str, Any]], tools: list[Any] | None
    ) -> tuple[str, list[dict[str, Any]]]:
        try:
            return self.render(messages, tools), messages
        except TemplateRejected:
            merged = _fold_system(messages)
            if merged is None:
                raise
            full = self.render(merged, tools)
            if not self._merge_warned:
                logger.warning(
                    "chat template rejects system messages: folded into the first user turn"
                )
                self._merge_warned = True
            return full, merged

    # -- one render: learnt header and end-of-turn text --------------------------------
    def _fast_spans(
        self, full: str, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[Span] | None:
        """Spans from `full` alone, or None when this conversation cannot be verified."""
        header, eot = self.probe.gen_prompt, self.probe.eot
        spans: list[Span] = []
        pos = 0
        if tools and _mentions(tools, header, eot):
            return None
        for message in messages:
            if _mentions(message, header, eot):
                return None  # template text inside a message: only prefix renders can tell
            content = message.get("content")
            content = content.strip() if isinstance(content, str) else ""
            if message["role"] != "assistant":
                if content:  # skip past it, so a header-like text inside is never matched
                    found = full.find(content, pos)
                    if found < 0:
                        return None
                    pos = found + len(content)
                continue
            span = self._fast_turn(full, pos, content, bool(message.get("tool_calls")))
            if span is None:
                return None
            spans.append(span)
            pos = span[1]
        return spans

    def _fast_turn(self, full: str, pos: int, content: str, has_calls: bool) -> Span | None:
        header, eot = self.probe.gen_prompt, self.probe.eot
        head = full.find(header, pos)
        if head < 0:
            return None
        start = body_end = head + len(header)
        if content:
            found = full.find(content, start)
            if found < 0 and "</think>" in content:  # reasoning of earlier turns is dropped
                tail = content.rsplit("</think>", 1)[1].strip()
                found, content = (full.find(tail, start), tail) if tail else (-1, content)
            if found >= 0 and full.find(header, start, found) < 0:
                body_end = found + len(content)
            elif not has_calls:  # templates may render tool calls instead of the content
                return None
        end = full.find(eot, body_end)
        if end < 0 or full.find(header, body_end, end) >= 0:
            return None  # this turn has no end-of-turn text of its own
        return start, end + len(eot)

    def _fast_path_agrees_on_probes(self) -> bool:
        """Whether the single render gives the prefix renders' spans on probe conversations."""
        header, eot = self.probe.gen_prompt, self.probe.eot
        if not header or not eot or header.isspace():
            return False
        user = {"role": "user", "content": "Hello there"}
        reply = {"role": "assistant", "content": "Hi, how can I help?"}
        probes = [  # no system message: a template that rejects one would warn at start-up
            [user, reply],
            [user, reply, {"role": "user", "content": "Thanks"}, {**reply, "content": "Bye."}],
        ]
        for messages in probes:
            try:
                full, rendered = self._render_full(messages, None)
                fast = self._fast_spans(full, rendered)
                if fast is not None and fast != self._slow_spans(full, rendered, None):
                    return False
            except TemplateRejected:
                continue  # e.g. a template that needs tools: the per-example check decides
        return True

    # -- prefix renders ------------------------------------------------------------------
    def _slow_spans(
        self, full: str, messages: list[dict[str, Any]], tools: list[Any] | None
    ) -> list[Span]:
        spans: list[Span] = []
        prev_end = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = self._turn_span(messages, tools, i, full, prev_end)
            spans.append(span)
            prev_end = span[1]
        return spans

    def _turn_span(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        i: int,
        full: str,
        prev_end: int,
    ) -> Span:
        start = -1
        if i > 0:
            prompt = self.render(messages[:i], tools, add_generation_prompt=True)
            common = _common_prefix_len(prompt, full)
            # Agreement up to the generation prompt means only the header differs, e.g. an
            # empty <think> block that this turn does not have.
            if common >= prev_end and common >= len(prompt) - self.probe.gen_prompt_len:
                start = common
        if start < 0:
            start = self._find_after(full, prev_end, (self.probe.header, self.probe.last_header))
        # the final message's rendering is `full` itself: one render saved per conversation
        upto = full if i == len(messages) - 1 else self.render(messages[: i + 1], tools)
        if full.startswith(upto) and len(upto) > start:
            end = len(upto)
        else:  # history rewritten after this turn: end at its end-of-turn text in `full`
            eot = self.probe.eot
            pos = full.find(eot, start) if eot else -1
            if pos < 0:
                raise TemplateRejected(
                    f"cannot locate assistant message {i} in the rendering: the template "
                    "rewrites earlier turns and has no end-of-turn text sftkit can find"
                )
            end = pos + len(eot)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end <= start:
            raise TemplateRejected(f"assistant message {i} renders to no text")
        return start, end

    @staticmethod
    def _find_after(full: str, pos: int, headers: tuple[str, ...]) -> int:
        for header in headers:
            if header and (found := full.find(header, pos)) >= 0:
                return found + len(header)
        raise TemplateRejected(
            "cannot locate an assistant turn: the template rewrites the conversation and its "
            "assistant header could not be found"
        )

    # -- probing ---------------------------------------------------------------------
    def _probe(self) -> Probe:
        user = {"role": "user", "content": _USER}
        asst = {"role": "assistant", "content": _ASSISTANT}
        try:
            alone = self.render([user])
            prompt = self.render([user], add_generation_prompt=True)
            one = self.render([user, asst])
            two = self.render(
                [
                    user,
                    asst,
                    {"role": "user", "content": _USER2},
                    {"role": "assistant", "content": _ASSISTANT2},
                ]
            )
        except TemplateRejected as err:
            logger.warning(
                "could not probe the chat template (%s); history-rewriting "
                "templates will not be supported",
                err,
            )
            return Probe("", "", "", 0, "")
        user_tail = alone[alone.find(_USER) + 1 :]  # e.g. "<|im_end|>\n"
        eot = one[one.find(_ASSISTANT) + 1 :].strip() if _ASSISTANT in one else ""
        return Probe(
            header=_between(two, _USER, _ASSISTANT, user_tail),
            last_header=_between(one, _USER, _ASSISTANT, user_tail),
            eot=eot,
            gen_prompt_len=max(len(prompt) - len(alone), 0),
            gen_prompt=prompt[len(alone) :] if prompt.startswith(alone) else "",
        )

    @property
    def has_eot(self) -> bool:
        """Whether assistant turns end with template text (else `add_eos` ends them)."""
        return bool(self.probe.eot)


def _mentions(value: Any, header: str, eot: str) -> bool:
    """Whether any string inside `value` (nested dicts and lists) contains either text."""
    if isinstance(value, str):
        return header in value or eot in value
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return False
    for item in value:  # a plain loop: this runs for every message of every row
        if isinstance(item, str):
            if header in item or eot in item:
                return True
        elif isinstance(item, (dict, list, tuple)) and _mentions(item, header, eot):
            return True
    return False


def _between(text: str, left: str, right: str, left_tail: str) -> str:
    a, b = text.find(left), text.find(right)
    if a < 0 or b < 0 or b < a:
        return ""
    middle = text[a + 1 : b]
    return middle[len(left_tail) :] if middle.startswith(left_tail) else middle


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case, one C-level compare
        return n
    lo, hi = 0, n  # binary search on prefix equality: O(n log n) in C, not a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    first = dict(messages[1])
    first["content"] = f"{messages[0]['content']}\n\n{first['content']}"
    return [first, *messages[2:]]
