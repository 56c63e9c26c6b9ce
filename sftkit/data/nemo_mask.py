"""NeMo RL's loss mask (`data.loss_mask: nemo_rl`), for comparing a migration token for token.

NeMo RL (`get_formatted_message_log` + `add_loss_mask_to_message_log`) renders the
conversation once per message prefix, takes each message's chunk as the difference of two
consecutive renders, tokenizes each chunk on its own and trains the chunks of the trained
roles whole. `add_generation_prompt` is passed for user and tool prefixes only, so with
`data.add_generation_prompt: false` the assistant header and the newline after `<|im_end|>`
are trained, and with `true` the header falls in the (untrained) user chunk. BOS is
prepended to the first chunk and EOS appended to the last one when they are missing.

One difference, on purpose: where the template rewrites history (Qwen3 and DeepSeek-R1 drop
earlier reasoning), NeMo RL's diff point falls inside an earlier turn and that text is
duplicated into later chunks (NVIDIA-NeMo/RL#2821). Here every chunk is a piece of the final
rendering: a prefix render that is not a prefix of it ends its chunk at the message's end
in the final text (an assistant turn: its end-of-turn text and the whitespace after it).
"""

from __future__ import annotations

from typing import Any

from sftkit.data.messages import Messages
from sftkit.data.templates import ChatRenderer, Span, _common_prefix_len

Chunk = tuple[str, str]  # (text, role)


def nemo_chunks(
    renderer: ChatRenderer,
    messages: Messages,
    tools: list[Any] | None,
    add_generation_prompt: bool,
    assistant_spans: list[Span] | None,
) -> list[Chunk]:
    """Each message's chunk of the final rendering, without duplicated history.

    `assistant_spans` are sftkit's spans of the assistant turns in the final rendering
    (needed only when a prefix render is not a prefix of it).
    """
    renders = [
        renderer.render(
            messages[: i + 1],
            tools,
            add_generation_prompt=add_generation_prompt and m["role"] in ("user", "tool"),
        )
        for i, m in enumerate(messages)
    ]
    final = renders[-1]
    bounds = []
    prev = 0
    spans = iter(assistant_spans or ())
    for i, (message, text) in enumerate(zip(messages, renders, strict=True)):
        span = next(spans, None) if message["role"] == "assistant" else None
        common = _common_prefix_len(text, final)
        if common < len(text) and span is not None:  # history rewritten after this turn
            common = span[1]
            while common < len(final) and final[common].isspace():
                common += 1
        bound = len(final) if i == len(messages) - 1 else max(common, prev)
        bounds.append(bound)
        prev = bound
    starts = [0, *bounds[:-1]]
    return [(final[a:b], m["role"]) for a, b, m in zip(starts, bounds, messages, strict=True)]


def with_bos_eos(chunks: list[Chunk], bos: str | None, eos: str | None) -> list[Chunk]:
    """NeMo RL's BOS on the first chunk and EOS on the last, where the text lacks them."""
    chunks = list(chunks)
    if bos and not chunks[0][0].startswith(bos):
        chunks[0] = (bos + chunks[0][0], chunks[0][1])
    if eos and not chunks[-1][0].rstrip("\n").endswith(eos):
        chunks[-1] = (chunks[-1][0] + eos, chunks[-1][1])
    return chunks


def tokenize_chunks(
    tokenizer: Any, texts: list[str], trained: list[bool]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the chunks tokenized one by one, and the trained token ranges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        id_lists = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        id_lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids: list[int] = []
    ranges = []
    for chunk_ids, train in zip(id_lists, trained, strict=True):
        if train and chunk_ids:
            ranges.append((len(ids), len(ids) + len(chunk_ids)))
        ids.extend(chunk_ids)
    return ids, ranges
