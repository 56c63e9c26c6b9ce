"""Turn one formatted row into token ids and a loss mask, and apply the length policy.

`Processor` is built once per worker process (it holds the tokenizer and the compiled
template) and is a pure function of its settings and the row, so results do not depend on
the number of workers.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any, Literal

from sftkit.data.errors import DataError
from sftkit.data.messages import normalize_conversation
from sftkit.data.templates import ChatRenderer, TemplateRejected
from sftkit.data.types import Example

OverlongPolicy = Literal["truncate", "drop", "mask"]
ORIGIN_KEY = "_origin"  # where a row came from ("train.jsonl:12"), set by the readers


@dataclass(frozen=True)
class ProcessorSettings:
    """Everything besides the tokenizer that changes the tokens or the mask."""

    max_length: int
    overlong_policy: OverlongPolicy = "truncate"
    add_bos: bool = True
    add_eos: bool = True
    only_unmask_final: bool = False
    drop_untrainable: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """One row's result: an example, or the reason it was dropped."""

    example: Example | None
    dropped: str | None = None  # "overlong" | "untrainable"
    masked: bool = False  # kept with a zero mask by overlong_policy=mask


class Processor:
    """Render, tokenize once with offsets, mask assistant spans, apply the length policy."""

    def __init__(self, tokenizer: Any, settings: ProcessorSettings) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} is not a fast tokenizer; "
                "sftkit needs character offsets to build the loss mask. Use a tokenizer with a "
                "tokenizer.json (any Hugging Face 'fast' tokenizer)."
            )
        template = tokenizer.chat_template
        if not template:
            raise ValueError(
                "the tokenizer has no chat template; load it with sftkit.data.load_tokenizer."
            )
        self.tokenizer = tokenizer
        self.settings = settings
        variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        variables.update(settings.template_kwargs)
        self.renderer = ChatRenderer(template, variables)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._bos = tokenizer.bos_token if settings.add_bos else None
        self._eos = tokenizer.eos_token if settings.add_eos else None

    def encode(self, row: dict[str, Any], where: str = "row") -> tuple[list[int], list[int], str]:
        """Return `(input_ids, loss_mask, text)` for a row, before the length policy."""
        where = str(row.get(ORIGIN_KEY, where))
        messages, tools = normalize_conversation(row, where)
        try:
            text, spans, messages = self.renderer.render_spans(messages, tools)
        except TemplateRejected as err:
            raise DataError(
                where,
                f"the chat template rejected this conversation: {err}.",
                "fix the conversation (e.g. alternate user/assistant turns) or choose another "
                "policy.tokenizer.chat_template.",
            ) from err
        if self.settings.only_unmask_final:
            spans = spans[-1:]
        ids, mask = self._tokenize_and_mask(text, spans)
        if self._bos and not text.startswith(self._bos):
            ids.insert(0, self.tokenizer.bos_token_id)
            mask.insert(0, 0)
        if self._eos and not text.rstrip().endswith(self._eos):
            # Templates without an end-of-turn token end the final reply with this EOS.
            final_trained = messages[-1]["role"] == "assistant" and not self.renderer.has_eot
            ids.append(self.tokenizer.eos_token_id)
            mask.append(1 if final_trained else 0)
        return ids, mask, text

    def process(self, row: dict[str, Any], task_name: str, where: str = "row") -> Outcome:
        """Encode a row and apply the length policy and the untrainable check."""
        where = str(row.get(ORIGIN_KEY, where))
        ids, mask, _ = self.encode(row, where)
        return self.apply_policy(ids, mask, task_name, where)

    def apply_policy(self, ids: list[int], mask: list[int], task_name: str, where: str) -> Outcome:
        """The length policy (truncate / drop / mask) and the zero-trained-tokens check."""
        limit = self.settings.max_length
        truncated = masked = False
        if len(ids) > limit:
            policy = self.settings.overlong_policy
            if policy == "drop":
                return Outcome(None, dropped="overlong")
            ids, mask = ids[:limit], mask[:limit]
            truncated = True
            if policy == "mask":  # NeMo RL: kept, but contributes nothing to the loss
                mask = [0] * len(mask)
                masked = True
        if not masked and not any(mask):
            if self.settings.drop_untrainable:
                return Outcome(None, dropped="untrainable")
            reason = f"after truncation to {limit} tokens" if truncated else "in this conversation"
            raise DataError(
                where,
                f"no token is trained {reason} (the assistant turns render to nothing trainable).",
                "raise data.max_input_seq_length / policy.max_total_sequence_length, or set "
                "data.drop_untrainable: true to drop and count such rows.",
            )
        return Outcome(Example(ids, mask, task_name, truncated), masked=masked)

    def _tokenize_and_mask(
        self, text: str, spans: list[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        if self._backend is None:
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(out["input_ids"])
            return ids, _mask_from_spans(out["offset_mapping"], spans, len(ids))
        # The Rust tokenizer directly: the same ids as `tokenizer(text)`, less overhead, and
        # span ends map to tokens without building the whole offsets list in Python.
        enc = self._backend.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [0] * len(ids)
        for start, end in spans:
            first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
            if first is None or last is None:  # a character no token covers (trimmed offsets)
                return ids, _mask_from_spans(enc.offsets, spans, len(ids))
            mask[first : last + 1] = [1] * (last + 1 - first)
        return ids, mask


def _mask_from_spans(
    offsets: list[tuple[int, int]], spans: list[tuple[int, int]], n: int
) -> list[int]:
    """Mark token i when its characters overlap a span (offsets are non-decreasing)."""
    mask = [0] * n
    for start, end in spans:
        first = bisect_right(offsets, start, key=lambda o: o[1])  # first token ending after start
        stop = bisect_left(
            offsets, end, lo=first, key=lambda o: o[0]
        )  # first starting at/after end
        mask[first:stop] = [1] * (stop - first)
    return mask
