"""Load the tokenizer and settle which chat template the run trains with."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sftkit.config.schema import PolicyConfig, TokenizerConfig

logger = logging.getLogger("sftkit")

# NeMo RL's `chat_template: null`: data that was templated offline, contents concatenated.
PASSTHROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
BUILTIN_PREFIX = "sftkit:"


def load_tokenizer(policy: PolicyConfig) -> PreTrainedTokenizerBase:
    """Load `policy.tokenizer.name` (default `policy.model_name`) and set its chat template.

    The name is a local directory, a hub id, or `sftkit:<builtin>`. The resolved template
    (see `resolve_chat_template`) is stored on the tokenizer, so a saved tokenizer carries
    the template the model was trained with. A tokenizer without a pad token pads with EOS.
    """
    tok_cfg = policy.tokenizer
    assert tok_cfg.name is not None  # derived at load from policy.model_name (config.derive)
    name = str(tok_cfg.name)
    if name.startswith(BUILTIN_PREFIX):
        from sftkit.model.builtin import resolve_model_path  # the model package owns these

        name = resolve_model_path(name)
    trust = policy.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"policy.tokenizer.name={name!r}: could not load a tokenizer ({reason}). Set "
            "policy.tokenizer.name (or policy.model_name) to a local directory holding "
            "tokenizer files or to a Hugging Face hub id you can reach."
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        logger.warning(
            "tokenizer %s is not a fast tokenizer: sftkit needs character offsets to build "
            "the loss mask; expect an error when data is prepared",
            name,
        )
    tokenizer.chat_template = resolve_chat_template(tok_cfg, tokenizer, name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as NeMo RL does
    if tokenizer.pad_token_id is None:  # else a TypeError when the first batch is padded
        raise ValueError(
            f"policy.tokenizer.name={name!r}: the tokenizer has neither a pad nor an EOS token, "
            "and batches are padded with one; set eos_token (or pad_token) in its "
            "tokenizer_config.json, or use a tokenizer that has them."
        )
    return tokenizer


def resolve_chat_template(
    tok_cfg: TokenizerConfig, tokenizer: PreTrainedTokenizerBase, name: str
) -> str:
    """Return the Jinja source the run renders with.

    `chat_template` (the seed's `custom_template` is copied into it at load):
    absent or "default" -> the tokenizer's own; None -> passthrough (contents concatenated);
    "*.jinja" -> that file; anything else -> an inline Jinja string.
    """
    choice: str | None = tok_cfg.chat_template
    if choice == "default":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: NeMo RL uses the default one
            own = own.get("default")
        if not own:
            raise ValueError(
                f"policy.tokenizer.chat_template='default' but tokenizer {name!r} has no chat "
                "template. Set policy.tokenizer.chat_template to a Jinja string or a .jinja file, "
                "or to null to concatenate message contents (data templated offline)."
            )
        return str(own)
    if choice is None:
        return PASSTHROUGH_TEMPLATE
    if not isinstance(choice, str):
        raise ValueError(
            f"policy.tokenizer.chat_template={choice!r}: expected 'default', null, a .jinja path "
            "or a Jinja string."
        )
    if choice.strip().endswith(".jinja"):
        path = Path(choice.strip()).expanduser()
        if not path.is_file():
            raise ValueError(
                f"policy.tokenizer.chat_template={choice!r}: file not found. Give an existing "
                ".jinja file (relative paths are from the working directory)."
            )
        return path.read_text(encoding="utf-8")
    return choice
