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

Real templates reject data that other templates accept (Gemma: no system role; Hermes:
tool results need a `name`; GLM-4.5: arguments must be an object; DeepSeek-R1: arguments
must be a string). A rejected conversation is retried with the adaptations of
`sftkit.data.messages` (in `_variants` order), each logged once; the text is always the template's
own rendering of the messages it was given, so `apply_chat_template` on them agrees.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftkit.data import render_guard
from sftkit.data.errors import DataError
from sftkit.data.messages import (
    Messages,
    arguments_as_objects,
    arguments_as_strings,
    fold_system,
    with_tool_result_names,
    with_tool_schemas,
)

logger = logging.getLogger("sftkit")

Span = tuple[int, int]
VERIFY_FIRST = 8  # conversations per renderer checked against the prefix renders
_USER, _ASSISTANT, _USER2, _ASSISTANT2 = "\ue000", "\ue001", "\ue002", "\ue003"
MIN_SUFFIX = 4  # shortest prompt tail that may locate an assistant turn in a rewritten `full`
Tools = list[Any] | None


class TemplateRejected(ValueError):
    """The chat template raised (e.g. `raise_exception('roles must alternate')`)."""


def _row_timeout(budget: float) -> TemplateRejected:
    return TemplateRejected(
        f"rendering it took more than {budget:g} s (the template loops too long)"
    )


def _probe_timeout(budget: float) -> DataError:
    return DataError(
        "policy.tokenizer.chat_template",
        f"rendering a two-turn probe conversation took more than {budget:g} s.",
        "use a template without runaway loops.",
    )


def compile_template(source: str) -> jinja2.Template:
    """Compile in the same sandbox transformers uses (`ImmutableSandboxedEnvironment`)."""
    render_guard.check_jinja_version()
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
    # end-of-turn text of an earlier turn when it differs from the final one's: gpt-oss ends
    # earlier turns with <|end|> and the last with <|return|>; Phi-4 appends EOS at the end
    eot_mid: str = ""


class ChatRenderer:
    """A compiled chat template plus the span finder for assistant turns."""

    def __init__(self, source: str, variables: dict[str, Any] | None = None) -> None:
        self.source = source
        self._template = compile_template(source)
        self._variables = dict(variables or {})
        self._warned: set[str] = set()  # adaptations / dropped roles already logged
        # conversations that took the single render ("fast") or the prefix renders
        self.stats = {"fast": 0, "fallback": 0}
        self._verify_left = VERIFY_FIRST
        budget = render_guard.RENDER_BUDGET_S
        with render_guard.time_budget(budget, lambda: _probe_timeout(budget)):
            self.probe = self._probe()
            self._fast = self._fast_path_agrees_on_probes()

    # -- rendering -------------------------------------------------------------------
    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """Render messages to text; any template error (or running over the time budget,
        when no row's budget encloses this render) becomes `TemplateRejected`."""
        budget = render_guard.RENDER_BUDGET_S
        try:
            with render_guard.time_budget(budget, lambda: _row_timeout(budget)):
                return self._template.render(
                    messages=messages,
                    tools=tools,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self._variables,
                )
        except TemplateRejected:
            raise
        except jinja2.exceptions.TemplateError as err:
            raise TemplateRejected(str(err)) from err
        except Exception as err:  # noqa: BLE001 - e.g. TypeError from `'text' + {...}`
            raise TemplateRejected(f"{type(err).__name__}: {err}") from err

    def render_spans(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> tuple[str, list[Span], list[dict[str, Any]]]:
        """Return `(full_text, spans, messages_rendered)`, one span per assistant message.

        A conversation the template rejects is retried with the adaptations of `_variants` (e.g. a leading
        system message folded into the first user turn, NeMo RL #2863).
        """
        budget = render_guard.RENDER_BUDGET_S
        with render_guard.time_budget(budget, lambda: _row_timeout(budget)):
            return self._render_spans(messages, tools)

    def _render_spans(
        self, messages: list[dict[str, Any]], tools: list[Any] | None
    ) -> tuple[str, list[Span], list[dict[str, Any]]]:
        full, messages, tools = self.render_full(messages, tools)
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

    def render_full(self, messages: Messages, tools: Tools) -> tuple[str, Messages, Tools]:
        """`(text, messages, tools)` as rendered: the data as given, else the first adaptation
        (`_variants`, cumulative) the template accepts. Raises the last `TemplateRejected`."""
        tried: list[str] = []
        last: TemplateRejected | None = None
        for name, (variant, variant_tools) in _variants(messages, tools):
            try:
                full = self.render(variant, variant_tools)
            except TemplateRejected as err:
                tried.append(name)
                last = err
                continue
            if name and name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "the chat template rejects this data as given; rendering it %s", name
                )
            self._warn_dropped(full, variant)
            return full, variant, variant_tools
        assert last is not None
        if len(tried) > 1:  # the last error is the one left after every adaptation
            raise TemplateRejected(f"{last} (also tried {'; '.join(tried[1:])})") from last
        raise last

    def _render_full(self, messages: Messages, tools: Tools) -> tuple[str, Messages]:
        full, rendered, _ = self.render_full(messages, tools)
        return full, rendered

    def _warn_dropped(self, full: str, messages: Messages) -> None:
        """Warn once when the template leaves tool calls or tool results out of the text."""
        for message in messages:
            dropped = ""
            if any(c["function"]["name"] not in full for c in message.get("tool_calls") or ()):
                dropped = "assistant tool_calls"
            elif message["role"] in ("tool", "ipython") and message["content"].strip() not in full:
                dropped = f"{message['role']} messages"
            if dropped and dropped not in self._warned:
                self._warned.add(dropped)
                logger.warning(
                    "the chat template does not render %s: they are left out of the training "
                    "text. Choose a template that renders them (policy.tokenizer.chat_template) "
                    "if the model should learn them",
                    dropped,
                )

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
        if not header or not eot or header.isspace() or self.probe.eot_mid != eot:
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
        start = self._turn_start(messages, tools, i, full, prev_end)
        # the final message's rendering is `full` itself: one render saved per conversation
        upto = full if i == len(messages) - 1 else self.render(messages[: i + 1], tools)
        if full.startswith(upto) and len(upto) > start:
            end = len(upto)
        else:  # history rewritten after this turn: end at its end-of-turn text in `full`
            end = self._rewritten_end(full, start, _common_prefix_len(upto, full), i)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end <= start:
            raise TemplateRejected(f"assistant message {i} renders to no text")
        return start, end

    def _turn_start(
        self, messages: Messages, tools: Tools, i: int, full: str, prev_end: int
    ) -> int:
        """Where turn `i`'s generated text starts in `full`: after its generation prompt."""
        if i > 0:
            prompt = self.render(messages[:i], tools, add_generation_prompt=True)
            common = _common_prefix_len(prompt, full)
            gen = self.probe.gen_prompt
            agreed = common - (len(prompt) - len(gen))  # characters of the header that agree
            # a prefix, or agreement through the header (only e.g. an empty <think> differs)
            if common >= prev_end and (common >= len(prompt) or gen[: max(agreed, 0)].strip()):
                return common
            # the template rewrites earlier text (Mistral v0.3 moves the system prompt into
            # the last user turn; DeepSeek's whitespace depends on what follows): the prompt's
            # tail still ends right where the turn starts
            found = _tail_end(full, prev_end, prompt.rstrip())
            if found >= 0:
                while found < len(full) and full[found].isspace():
                    found += 1
                return found
        return self._find_after(full, prev_end, (self.probe.header, self.probe.last_header))

    def _rewritten_end(self, full: str, start: int, common: int, i: int) -> int:
        """End of turn `i` when rendering it as the last turn disagrees with `full` at `common`.

        The turn ends at an end-of-turn text that starts by `common` (the renderings diverge
        inside it: gpt-oss `<|end|>` vs `<|return|>`), else at the first one after it (Qwen3
        drops the turn's <think> block, so the renderings diverge at its start).
        """
        eots = [e for e in dict.fromkeys((self.probe.eot_mid, self.probe.eot)) if e]
        before = [(p, e) for e in eots if (p := full.rfind(e, start, common + len(e))) >= 0]
        if before:
            pos, eot = max(before, key=lambda pe: pe[0] + len(pe[1]))
            return pos + len(eot)
        after = [(p, e) for e in eots if (p := full.find(e, max(start, common))) >= 0]
        if not after:
            raise TemplateRejected(
                f"cannot locate the end of assistant message {i} in the rendering: the template "
                "rewrites earlier turns and has no end-of-turn text sftkit can find"
            )
        pos, eot = min(after)
        return pos + len(eot)

    @staticmethod
    def _find_after(full: str, pos: int, headers: tuple[str, ...]) -> int:
        if not any(headers):  # no assistant header at all (the passthrough template): the
            return pos  # turn starts where the text before it ends, e.g. a leading reply
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
        tail = one[one.find(_ASSISTANT) + 1 :] if _ASSISTANT in one else ""
        eot = tail.strip()
        return Probe(
            header=_between(two, _USER, _ASSISTANT, user_tail),
            last_header=_between(one, _USER, _ASSISTANT, user_tail),
            eot=eot,
            gen_prompt_len=max(len(prompt) - len(alone), 0),
            gen_prompt=prompt[len(alone) :] if prompt.startswith(alone) else "",
            eot_mid=_mid_eot(tail, _between(two, _ASSISTANT, _USER2, ""), user_tail.strip()),
        )

    @property
    def has_eot(self) -> bool:
        """Whether assistant turns end with template text (else `add_eos` ends them)."""
        return bool(self.probe.eot)

    @property
    def inserted_before_reply(self) -> str:
        """An empty think block the template writes before the final reply beyond the
        generation prompt (Qwen3 with thinking on: `<think>\\n\\n</think>\\n\\n`), never
        trained; "" for any other text (gpt-oss's `<|channel|>final<|message|>` is trained)."""
        last, gen = self.probe.last_header, self.probe.gen_prompt
        extra = last[len(gen) :] if gen and last.startswith(gen) else ""
        return extra if re.fullmatch(r"\s*<think>\s*</think>\s*", extra) else ""


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


def _variants(messages: Messages, tools: Tools) -> Iterator[tuple[str, tuple[Messages, Tools]]]:
    """The conversation as given, then cumulative adaptations, each named for the log."""
    base = arguments_as_objects(messages) or messages
    yield "", (base, tools)
    schemas, named = with_tool_schemas(tools), with_tool_result_names(base)
    filled, filled_tools = named or base, schemas or tools
    if schemas or named:
        yield "with OpenAI tool schemas and tool result names", (filled, filled_tools)
    strings = arguments_as_strings(filled)
    if strings:
        yield "with tool-call arguments as JSON strings", (strings, filled_tools)
    folded = fold_system(filled)
    if folded:
        yield "with the system message folded into the first user turn", (folded, filled_tools)
        if strings:
            both = fold_system(strings) or strings
            yield "with the system message folded and arguments as strings", (both, filled_tools)


def _tail_end(full: str, lo: int, tail: str) -> int:
    """End of the longest suffix of `tail` found in `full[lo:]` (at least `MIN_SUFFIX`), or -1.

    Binary search: a suffix that occurs means every shorter one occurs too.
    """
    if len(tail) < MIN_SUFFIX or full.find(tail[-MIN_SUFFIX:], lo) < 0:
        return -1
    good, bad = MIN_SUFFIX, len(tail) + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if full.find(tail[-mid:], lo) >= 0:
            good = mid
        else:
            bad = mid
    return full.find(tail[-good:], lo) + good


def _mid_eot(last_tail: str, mid_tail: str, user_eot: str) -> str:
    """End-of-turn text of an earlier assistant turn, from what follows it in the probes.

    What the last and an earlier turn share (`<|im_end|>\n`); else, when they share nothing
    (gpt-oss `<|return|>` / `<|end|>`), the user turns' end-of-turn text if it follows.
    """
    shared = last_tail[: _common_prefix_len(last_tail, mid_tail)]
    # never end inside a marker: "<|end|><|assistant|>" and "<|end|><|user|>" share "<|end|><|"
    opener = max(shared.rfind("<"), shared.rfind("["))
    if opener > max(shared.rfind(">"), shared.rfind("]")):
        shared = shared[:opener]
    shared = shared.strip()
    if shared:
        return shared
    return user_eot if user_eot and mid_tail.lstrip().startswith(user_eot) else ""
