"""Turn formatted rows into token ids and a loss mask, and apply the length policy.

`Processor` is built once per worker process (it holds the tokenizer and the compiled
template) and is a pure function of its settings and the row, so results do not depend on
the number of workers or on how rows are batched. `process_batch` is the bulk path: it
renders a chunk of rows, tokenizes them with one call into the Rust tokenizer per
`TOKENIZE_BATCH` rows, and returns flat numpy arrays instead of one Python list per token.

Character spans become token ranges through the tokenizer's character offsets, which cost
about a quarter of the tokenizer's time. For byte-level BPE tokenizers (GPT-2, Llama-3,
Qwen) and ASCII text every token covers exactly the bytes of its vocabulary string, so the
offsets are the running sum of a per-token length table instead, and the tokenizer runs
without offsets (`encode_batch_fast`). The table is checked against the real offsets on
probe texts and on the first rows; a row whose token lengths do not add up to its text
takes the offsets path, as do non-ASCII rows and every row of any other tokenizer.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal

import numpy as np
from tokenizers import decoders, normalizers

from sftkit.config.derive import MIN_MAX_ROW_CHARS
from sftkit.data import nemo_mask, turns
from sftkit.data.errors import DataError
from sftkit.data.messages import normalize_conversation
from sftkit.data.templates import ChatRenderer, TemplateRejected
from sftkit.data.types import Example

OverlongPolicy = Literal["truncate", "drop", "mask"]
ORIGIN_KEY = "_origin"  # where a row came from ("train.jsonl:12"), set by the readers
DROP_CODES = {None: 0, "overlong": 1, "untrainable": 2, "oversize": 3}
DEFAULT_MAX_ROW_CHARS = MIN_MAX_ROW_CHARS  # data.max_row_chars: null -> max(this, 8 x limit)
TOKENIZE_BATCH = 256  # rows per Rust call: amortizes call overhead, bounds Encoding memory
Ranges = list[tuple[int, int]]  # trained token ranges [first, stop)
VERIFY_FIRST = 8  # rows per processor whose byte-table ranges are checked against offsets
# normalizers that leave ASCII text unchanged, so token lengths still add up to the text
ASCII_SAFE_NORMALIZERS = (normalizers.NFC, normalizers.NFD, normalizers.NFKC, normalizers.NFKD)
logger = logging.getLogger("sftkit")


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
    max_row_chars: int = DEFAULT_MAX_ROW_CHARS  # longer rows are dropped before rendering
    reasoning: str = "train"  # train | mask | drop_history (sftkit.data.turns)
    loss_mask: str = "sftkit"  # sftkit | nemo_rl (sftkit.data.nemo_mask)
    add_generation_prompt: bool = False  # read by loss_mask: nemo_rl only


@dataclass
class Outcome:
    """One row's result: an example, or the reason it was dropped."""

    example: Example | None
    dropped: str | None = None  # "overlong" | "untrainable" | "oversize"
    masked: bool = False  # kept with a zero mask by overlong_policy=mask


@dataclass
class BatchResult:
    """`process_batch` output: per-row flags plus the kept examples' tokens end to end."""

    ids: np.ndarray  # int32, kept examples concatenated
    mask: np.ndarray  # uint8, same length as ids
    lengths: np.ndarray  # int64 per row, 0 for a dropped row
    drops: np.ndarray  # int8 per row, DROP_CODES
    truncated: np.ndarray  # bool per row
    masked: np.ndarray  # bool per row
    paths: dict[str, int]  # rows per path: spans (fast/fallback), offsets (bytes/chars)
    # int64 per row: tokens before the length policy (-1: an oversize row, never tokenized)
    full_lengths: np.ndarray | None = None
    oversize: list[str] = field(default_factory=list)  # where the first oversize row was

    @classmethod
    def empty(cls) -> BatchResult:
        """The result for no rows."""
        none = np.zeros(0, dtype=np.int64)
        return cls(
            none.astype(np.int32),
            none.astype(np.uint8),
            none,
            none.astype(np.int8),
            none.astype(bool),
            none.astype(bool),
            {},
        )


@dataclass
class _Rendered:
    text: str
    spans: list[tuple[int, int]]
    final_is_assistant: bool
    where: str
    reasoning: list[tuple[int, int]] = field(default_factory=list)  # reasoning text spans
    deselected: bool = False  # per-turn flags left some assistant turn untrained
    chunks: list[tuple[str, bool]] | None = None  # loss_mask nemo_rl: (text, trained) each


class Processor:
    """Render, tokenize once, mask assistant spans, apply the length policy."""

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
        self._stop_ids = _special_ids(tokenizer)
        self._bos = tokenizer.bos_token if settings.add_bos else None
        self._eos = tokenizer.eos_token if settings.add_eos else None
        self.offset_stats = {"bytes": 0, "chars": 0}  # rows per span-to-token mapping
        self._verify_left = VERIFY_FIRST
        self._byte_lengths = self._checked_byte_lengths()

    # -- one row (preview, tests) ----------------------------------------------------------
    def encode(self, row: dict[str, Any], where: str = "row") -> tuple[list[int], list[int], str]:
        """Return `(input_ids, loss_mask, text)` for a row, before the length policy."""
        ids, mask, text, _ = self._encode(row, where)
        return ids, mask, text

    def explain(self, row: dict[str, Any], where: str = "row") -> dict[str, Any]:
        """`encode` plus `reasoning_mask` (1 on reasoning tokens, trained or not) and
        `deselected` (per-turn flags left an assistant turn untrained), for previews."""
        ids, mask, text, rendered = self._encode(row, where)
        reasoning = [0] * len(ids)
        if rendered.reasoning:
            probe = _Rendered(text, rendered.reasoning, False, rendered.where)
            ((_, ranges),) = self._tokenize([probe])
            for first, stop in ranges:
                reasoning[first:stop] = [1] * (stop - first)
        return {"input_ids": ids, "loss_mask": mask, "text": text,
                "reasoning_mask": reasoning, "deselected": rendered.deselected}  # fmt: skip

    def _encode(
        self, row: dict[str, Any], where: str
    ) -> tuple[list[int], list[int], str, _Rendered]:
        rendered = self._render(row, where)
        ((ids, ranges),) = self._tokenize([rendered])
        mask = [0] * len(ids)
        for first, stop in ranges:
            mask[first:stop] = [1] * (stop - first)
        return ids, mask, rendered.text, rendered

    def process(self, row: dict[str, Any], task_name: str, where: str = "row") -> Outcome:
        """Encode a row and apply the length policy and the untrainable check."""
        where = str(row.get(ORIGIN_KEY, where))
        if row_chars(row, self.settings.max_row_chars) > self.settings.max_row_chars:
            return Outcome(None, dropped="oversize")
        ids, mask, _, rendered = self._encode(row, where)
        return self.apply_policy(ids, mask, task_name, where, rendered.deselected)

    def apply_policy(
        self, ids: list[int], mask: list[int], task_name: str, where: str, deselected: bool = False
    ) -> Outcome:
        """The length policy (truncate / drop / mask) and the zero-trained-tokens check."""
        ranges = _ranges_of(mask)
        drop, kept, truncated, masked = self._policy(len(ids), ranges, where, deselected)
        if drop:
            return Outcome(None, dropped=drop)
        mask = [0] * kept if masked else mask[:kept]
        return Outcome(Example(ids[:kept], mask, task_name, truncated), masked=masked)

    # -- many rows (prepare_data) ----------------------------------------------------------
    def process_batch(self, rows: Sequence[dict[str, Any]], wheres: Sequence[str]) -> BatchResult:
        """Process rows in order; the same result as `process` on each, as flat arrays."""
        before = self._paths()
        ids_out: list[int] = []
        ranges_out: Ranges = []
        n = len(rows)
        lengths = np.zeros(n, dtype=np.int64)
        drops = np.zeros(n, dtype=np.int8)
        truncated = np.zeros(n, dtype=bool)
        masked = np.zeros(n, dtype=bool)
        full = np.full(n, -1, dtype=np.int64)  # -1: not tokenized (oversize)
        oversize: list[str] = []
        limit = self.settings.max_row_chars
        for lo in range(0, n, TOKENIZE_BATCH):
            todo = []
            for k in range(lo, min(lo + TOKENIZE_BATCH, n)):
                if row_chars(rows[k], limit) > limit:  # before any copy of its text is made
                    drops[k] = DROP_CODES["oversize"]
                    oversize = oversize or [str(rows[k].get(ORIGIN_KEY, wheres[k]))]
                else:
                    todo.append(k)
            rendered = [self._render(rows[k], wheres[k]) for k in todo]
            for k, r, (ids, ranges) in zip(todo, rendered, self._tokenize(rendered), strict=True):
                full[k] = len(ids)
                drop, kept, truncated[k], masked[k] = self._policy(
                    len(ids), ranges, r.where, r.deselected
                )
                if drop:
                    drops[k] = DROP_CODES[drop]
                    continue
                base = len(ids_out)
                ids_out.extend(ids[:kept] if kept < len(ids) else ids)
                lengths[k] = kept
                if not masked[k]:
                    ranges_out += [(base + a, base + min(b, kept)) for a, b in ranges if a < kept]
        mask = np.zeros(len(ids_out), dtype=np.uint8)
        for first, stop in ranges_out:
            mask[first:stop] = 1
        after = self._paths()
        return BatchResult(
            ids=np.asarray(ids_out, dtype=np.int32),
            mask=mask,
            lengths=lengths,
            drops=drops,
            truncated=truncated,
            masked=masked,
            paths={k: after[k] - before[k] for k in after},
            full_lengths=full,
            oversize=oversize,
        )

    def _paths(self) -> dict[str, int]:
        spans, offsets = self.renderer.stats, self.offset_stats
        return {
            "span_fallbacks": spans["fallback"],
            "offset_fallbacks": offsets["chars"],
        }

    # -- steps -----------------------------------------------------------------------------
    def _render(self, row: dict[str, Any], where: str) -> _Rendered:
        where = str(row.get(ORIGIN_KEY, where))
        messages, tools = normalize_conversation(row, where)
        flags = turns.message_flags(row, where)
        messages = turns.without_train_keys(messages)
        if self.settings.reasoning == "drop_history":
            messages = turns.drop_history(messages)
        try:
            text, spans, rendered = self.renderer.render_spans(messages, tools)
            nemo = self.settings.loss_mask == "nemo_rl"
            roles, tool_calls_only = turns.row_rules(row)
            final = turns.final_index(rendered, self.settings.only_unmask_final, nemo)
            # a template that folds the system message into the first user turn renders
            # fewer messages: the flags follow the messages they belong to
            flags = flags[len(flags) - len(rendered) :]
            chosen = turns.selected(rendered, flags, roles, tool_calls_only, final)
            if nemo:
                return self._nemo_render(rendered, tools, spans, chosen, where)
        except TemplateRejected as err:
            roles_seen = ", ".join(m["role"] for m in messages)
            raise DataError(
                where,
                f"the chat template rejected this conversation (roles: {roles_seen}): {err}.",
                "make the conversation fit what this template accepts (e.g. alternating "
                "user/assistant turns, no tool messages, tool-call ids of the length it asks "
                "for), drop the row, or choose another policy.tokenizer.chat_template.",
            ) from err
        inserted = self.renderer.inserted_before_reply
        trained, reasoning = turns.trained_spans(
            text, rendered, spans, chosen, self.settings.reasoning, inserted, where,
            turns.THINK_CLOSE in self.renderer.probe.gen_prompt,
        )  # fmt: skip
        last_chosen = bool(chosen) and chosen[-1] and rendered[-1]["role"] == "assistant"
        deselected = any(
            not c for c, m in zip(chosen, rendered, strict=True) if m["role"] == "assistant"
        )
        return _Rendered(text, trained, last_chosen, where, reasoning, deselected)

    def _nemo_render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        spans: list[tuple[int, int]],
        chosen: list[bool],
        where: str,
    ) -> _Rendered:
        _, _, tools = self.renderer.render_full(messages, tools)  # tools as adapted
        chunks = nemo_mask.nemo_chunks(
            self.renderer, messages, tools, self.settings.add_generation_prompt, spans
        )
        chunks = nemo_mask.with_bos_eos(chunks, self._bos, self._eos)
        pairs = [(text, c) for (text, _), c in zip(chunks, chosen, strict=True)]
        text = "".join(t for t, _ in pairs)
        deselected = any(
            not c for c, m in zip(chosen, messages, strict=True) if m["role"] == "assistant"
        )
        return _Rendered(text, [], False, where, deselected=deselected, chunks=pairs)

    def _tokenize(self, rendered: Sequence[_Rendered]) -> list[tuple[list[int], Ranges]]:
        """Token ids and trained token ranges per rendering, BOS/EOS added as configured."""
        if any(r.chunks is not None for r in rendered):  # loss_mask nemo_rl: every row
            return [self._tokenize_chunks(r) for r in rendered]
        texts = [r.text for r in rendered]
        if self._backend is None:
            outs = [
                self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
                for t in texts
            ]
            pairs: list[tuple[list[int], Ranges] | None] = [
                (list(o["input_ids"]), _ranges_from_offsets(o["offset_mapping"], r.spans))
                for o, r in zip(outs, rendered, strict=True)
            ]
        else:
            pairs = self._tokenize_by_bytes(rendered)
            rest = [k for k, pair in enumerate(pairs) if pair is None]
            # the Rust tokenizer directly: the same ids as `tokenizer(text)`, less overhead
            encodings = self._backend.encode_batch(
                [texts[k] for k in rest], add_special_tokens=False
            )
            for k, enc in zip(rest, encodings, strict=True):
                pairs[k] = (enc.ids, _ranges_from_encoding(enc, rendered[k].spans))
            self.offset_stats["chars"] += len(rest)
            self.offset_stats["bytes"] += len(pairs) - len(rest)
        return [
            self._add_bos_eos(ids, self._with_stop_tokens(ids, ranges), r)
            for (ids, ranges), r in zip(_all(pairs), rendered, strict=True)
        ]

    def _tokenize_chunks(self, rendered: _Rendered) -> tuple[list[int], Ranges]:
        """NeMo RL's tokenization: each message's chunk on its own (BOS/EOS are in the text)."""
        assert rendered.chunks is not None
        texts, trained = zip(*rendered.chunks, strict=True)
        return nemo_mask.tokenize_chunks(self.tokenizer, list(texts), list(trained))

    def _tokenize_by_bytes(
        self, rendered: Sequence[_Rendered]
    ) -> list[tuple[list[int], Ranges] | None]:
        """Ids without offsets, and ranges from the byte table; None where that cannot be used."""
        pairs: list[tuple[list[int], Ranges] | None] = [None] * len(rendered)
        table = self._byte_lengths
        if table is None or self._backend is None:
            return pairs
        ascii_rows = [k for k, r in enumerate(rendered) if r.text.isascii()]
        texts = [rendered[k].text for k in ascii_rows]
        id_lists = [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        spans = [rendered[k].spans for k in ascii_rows]
        found = _ranges_from_lengths(table, id_lists, [len(t) for t in texts], spans)
        for k, ids, ranges in zip(ascii_rows, id_lists, found, strict=True):
            if ranges is not None:
                pairs[k] = (ids, ranges)
        if self._verify_left > 0:  # the first rows are checked against the real offsets
            n = min(self._verify_left, len(ascii_rows))
            self._verify_left -= n
            checked = [pairs[k] for k in ascii_rows[:n]]
            if not self._byte_ranges_agree(texts[:n], checked, spans[:n]):
                logger.warning(
                    "token lengths disagree with the tokenizer's offsets; using offsets for "
                    "every row (slower)"
                )
                self._byte_lengths = None
                return [None] * len(rendered)
        return pairs

    def _byte_ranges_agree(
        self,
        texts: list[str],
        pairs: list[tuple[list[int], Ranges] | None],
        spans: list[list[tuple[int, int]]],
    ) -> bool:
        assert self._backend is not None
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        for enc, pair, row_spans in zip(encodings, pairs, spans, strict=True):
            if pair is not None and pair != (enc.ids, _ranges_from_encoding(enc, row_spans)):
                return False
        return True

    def _checked_byte_lengths(self) -> np.ndarray | None:
        """The per-token byte table when it reproduces the tokenizer's offsets on probes."""
        backend = self._backend
        if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
            return None
        norm = backend.normalizer
        if norm is not None and not isinstance(norm, ASCII_SAFE_NORMALIZERS):
            return None
        table = _byte_length_table(backend)
        probe = [{"role": "user", "content": "Hi  there,\tfriend!\n\n 12 + 30 = 42?"}]
        probe.append({"role": "assistant", "content": " Sure:  it's 42.\n  Done. "})
        try:
            texts = [self.renderer.render(probe), probe[0]["content"] + probe[1]["content"]]
        except TemplateRejected:
            texts = [probe[0]["content"] + probe[1]["content"]]
        for text in texts:
            enc = backend.encode(text, add_special_tokens=False)
            ends = np.cumsum(table[np.asarray(enc.ids, dtype=np.int64)]).tolist()
            starts = [0, *ends[:-1]]
            if list(zip(starts, ends, strict=True)) != enc.offsets:
                return None
        return table

    def _with_stop_tokens(self, ids: list[int], ranges: Ranges) -> Ranges:
        """Each turn's stop token, for templates whose earlier turns have no end-of-turn text.

        GLM-4.5 ends a turn with the next role's special token (`<|user|>`,
        `<|observation|>`), which its generation config lists as EOS: the model must learn
        to emit it, as GLM's own fine-tuning script trains it. Only special tokens qualify.
        """
        if self.renderer.probe.eot_mid or not self._stop_ids:
            return ranges
        return [
            (a, b + 1) if b < len(ids) and ids[b] in self._stop_ids else (a, b) for a, b in ranges
        ]

    def _add_bos_eos(
        self, ids: list[int], ranges: Ranges, rendered: _Rendered
    ) -> tuple[list[int], Ranges]:
        text = rendered.text
        if self._bos and not text.startswith(self._bos):
            ids = [self.tokenizer.bos_token_id, *ids]
            ranges = [(a + 1, b + 1) for a, b in ranges]
        if self._eos and not text.rstrip().endswith(self._eos):
            # Templates without an end-of-turn token end the final reply with this EOS.
            ids.append(self.tokenizer.eos_token_id)
            if rendered.final_is_assistant and not self.renderer.has_eot:
                ranges.append((len(ids) - 1, len(ids)))
        return ids, ranges

    def _policy(
        self, n: int, ranges: Ranges, where: str, deselected: bool = False
    ) -> tuple[str | None, int, bool, bool]:
        """`(drop reason, tokens kept, truncated, masked)` for an example of `n` tokens.

        A row whose `train` flags / `roles_to_train` leave nothing trained (`deselected`) is
        dropped and counted as untrainable: the data asked for it."""
        limit = self.settings.max_length
        truncated = masked = False
        kept = n
        if n > limit:
            policy = self.settings.overlong_policy
            if policy == "drop":
                return "overlong", 0, False, False
            kept, truncated = limit, True
            masked = policy == "mask"  # NeMo RL: kept, but contributes nothing to the loss
        if not masked and not any(first < kept for first, stop in ranges if stop > first):
            if self.settings.drop_untrainable or (deselected and not truncated):
                return "untrainable", 0, False, False
            if truncated:
                problem = (
                    f"no token is trained after truncation to {limit} tokens (the prompt alone "
                    "reaches the limit)."
                )
                fix = (
                    "raise data.max_input_seq_length / policy.max_total_sequence_length, or set "
                    "data.overlong_policy: drop (or data.drop_untrainable: true) to drop and "
                    "count such rows."
                )
            else:
                problem = (
                    "no token is trained in this conversation (its assistant turns render to "
                    "nothing trainable)."
                )
                fix = (
                    "give it an assistant reply, or set data.drop_untrainable: true to drop and "
                    "count such rows."
                )
            raise DataError(where, problem, fix)
        return None, kept, truncated, masked


def row_chars(row: Any, limit: int) -> int:
    """Characters in a row's strings (keys included, origin not), counted until `limit` is passed.

    Iterative, so a row nested deeper than the recursion limit is measured too.
    """
    total = 0
    stack = [v for k, v in row.items() if k != ORIGIN_KEY] if isinstance(row, dict) else [row]
    while stack and total <= limit:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return total


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of special tokens (named ones and added tokens marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return frozenset(ids)


def _all(pairs: list[tuple[list[int], Ranges] | None]) -> list[tuple[list[int], Ranges]]:
    assert all(pair is not None for pair in pairs)
    return pairs  # type: ignore[return-value]


def _byte_length_table(backend: Any) -> np.ndarray:
    """Bytes of text per token id: one per character of a byte-level vocabulary string."""
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    size = max([*vocab.values(), *added, -1]) + 1
    # an id outside the vocabulary makes its row's lengths never add up: offsets path
    table = np.full(size, 1 << 40, dtype=np.int64)
    table[np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))] = np.fromiter(
        map(len, vocab), dtype=np.int64, count=len(vocab)
    )
    for i, token in added.items():
        table[i] = len(token.content.encode("utf-8"))
    return table


def _ranges_from_lengths(
    table: np.ndarray,
    id_lists: list[list[int]],
    text_lengths: list[int],
    spans: list[list[tuple[int, int]]],
) -> list[Ranges | None]:
    """Token ranges from per-token byte lengths, a whole batch at once (ASCII texts).

    A row is None when its token lengths do not add up to its text's length.
    """
    if not id_lists:
        return []
    counts = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(counts.sum()))
    ends = np.cumsum(table[flat])  # where each token ends in the concatenated texts
    last = np.cumsum(counts) - 1  # each row's last token
    first = last - counts + 1
    bases = np.where(first > 0, ends[np.maximum(first - 1, 0)], 0)
    valid = (ends[last] - bases == np.asarray(text_lengths)).tolist()
    # the token holding a character: the first whose end lies after it
    queries = [
        base + pos
        for base, row, ok in zip(bases.tolist(), spans, valid, strict=True)
        if ok
        for start, end in row
        for pos in (start, end - 1)
    ]
    hits = iter(np.searchsorted(ends, queries, side="right").tolist())
    out: list[Ranges | None] = []
    for lo, row, ok in zip(first.tolist(), spans, valid, strict=True):
        out.append([(next(hits) - lo, next(hits) - lo + 1) for _ in row] if ok else None)
    return out


def _ranges_from_encoding(enc: Any, spans: list[tuple[int, int]]) -> Ranges:
    """Span ends map to tokens without building the whole offsets list in Python."""
    ranges: Ranges = []
    for start, end in spans:
        first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
        if first is None or last is None:  # a character no token covers (trimmed offsets)
            return _ranges_from_offsets(enc.offsets, spans)
        ranges.append((first, last + 1))
    return ranges


def _ranges_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> Ranges:
    """Token i is trained when its characters overlap a span (offsets are non-decreasing)."""
    ranges: Ranges = []
    for start, end in spans:
        first = bisect_right(offsets, start, key=lambda o: o[1])  # first token ending after start
        stop = bisect_left(
            offsets, end, lo=first, key=lambda o: o[0]
        )  # first starting at/after end
        ranges.append((first, stop))
    return ranges


def _ranges_of(mask: list[int]) -> Ranges:
    ranges: Ranges = []
    start = None
    for k, m in enumerate(mask):
        if m and start is None:
            start = k
        elif not m and start is not None:
            ranges.append((start, k))
            start = None
    if start is not None:
        ranges.append((start, len(mask)))
    return ranges
