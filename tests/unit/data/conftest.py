"""Tiny in-process tokenizers for the data tests: a byte-level BPE and a Metaspace one.

Both are trained on a few local sentences with every special token the template fixtures
use, then wrapped in `PreTrainedTokenizerFast`. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TEMPLATES = FIXTURES / "templates"

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
]
ADDED = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
# (bos, eos) per template family, as the real tokenizers set them
FAMILY_TOKENS = {
    "qwen25": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama31_tools": ("<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<eos>"),
    "gemma_strict": ("<bos>", "<eos>"),
    "mistral": ("<s>", "</s>"),
}

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Let me think step by step about this problem before answering.",
    "The weather in Paris is sunny and 22 degrees celsius today.",
    "You are a helpful assistant. Answer the question briefly.",
    "get_weather city unit fahrenheit calculator expression precision query search",
    "Hello! How can I help you today? Thanks, goodbye.",
    "12 + 30 = 42. The answer is 42.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
] * 4


def _train(pre_tokenizer, decoder) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    if isinstance(decoder, decoders.ByteLevel):
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: every character the tests use must be in the vocabulary
        alphabet = sorted(set("".join(CORPUS)) | set("\n!?{}[]<>|_:\"'.,+=-*/#0123456789"))
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens(ADDED)
    return tok


_BYTE = None
_META = None


def byte_level_backend() -> Tokenizer:
    global _BYTE
    if _BYTE is None:
        _BYTE = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())
    return _BYTE


def metaspace_backend() -> Tokenizer:
    global _META
    if _META is None:
        _META = _train(pre_tokenizers.Metaspace(), decoders.Metaspace())
    return _META


def make_tokenizer(family: str = "qwen25", kind: str = "byte") -> PreTrainedTokenizerFast:
    """A fast tokenizer with the family's template and BOS/EOS."""
    backend = byte_level_backend() if kind == "byte" else metaspace_backend()
    bos, eos = FAMILY_TOKENS.get(family, (None, "<|endoftext|>"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend.to_str()), bos_token=bos, eos_token=eos
    )
    path = TEMPLATES / f"{family}.jinja"
    if path.exists():
        tok.chat_template = path.read_text()
    return tok


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """A tokenizer saved to disk (usable as policy.tokenizer.name) with the ChatML template."""
    tok = make_tokenizer("qwen25")
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    return out


# Conversation pieces shared by the mask and template-family tests.
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "The capital of France is Paris."}
Q2 = {"role": "user", "content": "Thanks"}
A2 = {"role": "assistant", "content": "Hello! How can I help you today?"}
TOOLS = [  # heterogeneous argument schemas
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Math",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}, "precision": {"type": "integer"}},
            },
        },
    },
]


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The token ids of each maximal run of trained positions, in order."""
    runs: list[list[int]] = []
    for k, (tok, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if k == 0 or not mask[k - 1]:
                runs.append([])
            runs[-1].append(tok)
    return runs
