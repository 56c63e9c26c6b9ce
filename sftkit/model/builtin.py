"""Built-in models that need no network: created locally and deterministically on first use.

`policy.model_name: sftkit:tiny-llama` names a ~1M-parameter Llama with a byte-level BPE
tokenizer and a ChatML chat template. It lives in `$SFTKIT_HOME/models/tiny-llama`
(default `~/.cache/sftkit/models/tiny-llama`) and is built the first time a run asks for it.
To train a hub model instead, set `policy.model_name` to its id or a local directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("sftkit")

PREFIX = "sftkit:"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class BuiltinSpec:
    """Shape of a built-in model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 512


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny-llama": BuiltinSpec(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
    ),
}


def sftkit_home() -> Path:
    """Root of sftkit's local files (`$SFTKIT_HOME`, default `~/.cache/sftkit`)."""
    return Path(os.environ.get("SFTKIT_HOME", Path.home() / ".cache" / "sftkit"))


def is_builtin(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def resolve_model_path(name: str) -> str:
    """Map `sftkit:<name>` to its local directory, building it on first use; pass others through."""
    if not is_builtin(name):
        return name
    key = name[len(PREFIX) :]
    if key not in BUILTINS:
        raise ValueError(
            f"Unknown built-in model '{name}'. Built-ins: "
            f"{', '.join(PREFIX + k for k in BUILTINS)}; or set policy.model_name to an HF id "
            "or a local directory."
        )
    path = sftkit_home() / "models" / key
    if not (path / "config.json").exists():
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        # One builder at a time: ranks of one job (or parallel tests) share this directory.
        with open(path.parent / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "config.json").exists():
                logger.info("Creating built-in model %s at %s (first use)", name, path)
                build_builtin(key, path)
    return str(path)


def _tokenizer_corpus() -> list[str]:
    """Fixed training text for the BPE: chat markup, digits and common English words."""
    words = (
        "system user assistant tool You are a helpful assistant . What is the answer ? "
        "The question context Answer Question : yes no and or the of to in is it for "
        "with on that this be are as at by from calculate sum plus minus equals result"
    ).split()
    lines = []
    for i in range(200):
        a, b = (i * 37) % 100, (i * 53 + 11) % 100
        lines.append(f"system\nYou are a helpful assistant.\nuser\n{a}+{b}\nassistant\n{a + b}\n")
        lines.append(" ".join(words[(i + k) % len(words)] for k in range(12)))
    return lines


def build_tokenizer(vocab_size: int):
    """A deterministic byte-level BPE with single-digit tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits stay single tokens so arithmetic is learnable position by position.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_builtin(key: str, path: Path, seed: int = 0) -> None:
    """Write the built-in model `key` (config, random weights, tokenizer) to `path` atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = BUILTINS[key]
    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so a crash never leaves a half-written model
    # that later runs would mistake for a complete one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def adapter_base_name(name: str) -> str:
    """`base_model_name_or_path` for a saved adapter: something `from_pretrained` loads with
    no sftkit import (a built-in's directory, a local directory made absolute, a hub id)."""
    if is_builtin(name):
        return str(Path(resolve_model_path(name)).resolve())
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name
