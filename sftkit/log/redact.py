"""Keep API keys and tokens out of logs, saved configs, tracker configs and checkpoint metadata.

Two rules, applied together:

* a string under a secret-looking key (`api_key`, `hf_token`, `password`, ...) becomes
  `"***"`; data-field names such as `input_key` and special-token names such as
  `pad_token` are not secrets and are kept, because configs must reload unchanged;
* any occurrence of the value of a secret-looking environment variable (`WANDB_API_KEY`,
  `HF_TOKEN`, `*_KEY`, `*_TOKEN`, `*_PASS`, `*PASSWORD*`, `*SECRET*`, ...) in any string
  becomes `"***"`, wherever it appears (a URL, a log message, a traceback), and so does the
  password of a URL (`https://user:pass@host` -> `https://user:***@host`).

`scrub` is the one function that does the second rule; everything sftkit writes or logs
(saved `config.yaml`, tracker configs and run names, log records, error messages,
tracebacks, eval results) goes through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

REDACTED = "***"

# Key names whose string values are secrets.
_SECRET_NAME = re.compile(r"key|token|secret|passw(or)?d|credential", re.IGNORECASE)
# Names that match the pattern above but hold public values that configs need verbatim:
# dataset field names (`input_key: input`), special tokens (`pad_token: <pad>`), tokenizer
# sections. Only string values are ever replaced, so counts such as `train_mb_tokens` stay.
_PUBLIC_NAME = re.compile(
    r"^(\w+_)?(input|output|problem|solution|prompt|system|response|answer|question|label|"
    r"text|messages?|chosen|rejected|role|content|metric|tools?|image|task|reference|target|"
    r"context|query|sort|group)_key$"
    r"|^(pad|eos|bos|unk|sep|cls|mask|additional_special)_tokens?(_ids?)?$"
    r"|tokeni[sz]er",
    re.IGNORECASE,
)
# Environment variables whose values are secrets.
_SECRET_ENV = re.compile(
    # `PWD` is not one: it is the working directory.
    r"(^|_)(API_?KEY|KEY|TOKEN|PASS|CREDENTIALS?)(_|$)|SECRET|PASSW(OR)?D|PASSPHRASE",
    re.IGNORECASE,
)
# Shorter values ("1", "true", "false", paths like "/tmp") would scrub ordinary text.
_MIN_SECRET_LEN = 8
# A value the config read with `${oc.env:NAME}` from a secret-looking NAME is known to be
# used, so a shorter one is hidden too (but not 1-3 characters: "1" would eat step numbers).
_MIN_INTERPOLATED_LEN = 4
_interpolated: set[str] = set()
# The password of a URL: `scheme://user:password@host` (user may be empty).
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*):([^@/\s]+)@", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True when a config key's string value should be hidden (`hf_token`, `api_key`, ...)."""
    return bool(_SECRET_NAME.search(name)) and not _PUBLIC_NAME.search(name)


def is_secret_env_name(name: str) -> bool:
    """True when an environment variable's value is a secret (`HF_TOKEN`, `DB_PASS`, ...)."""
    return bool(_SECRET_ENV.search(name))


def remember_interpolated(name: str, value: object) -> None:
    """Note the value of `${oc.env:name}` when `name` is secret-looking (scrubbed from then on)."""
    if is_secret_env_name(name) and isinstance(value, str):
        if len(value) >= _MIN_INTERPOLATED_LEN:
            _interpolated.add(value)


def env_secrets() -> list[str]:
    """Values of secret-looking environment variables, longest first (read at call time),
    and the values of such variables that a config interpolated."""
    values = {
        value
        for name, value in os.environ.items()
        if _SECRET_ENV.search(name) and len(value) >= _MIN_SECRET_LEN
    } | _interpolated
    # Longest first, so that a secret containing another one is replaced whole.
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """Replace every occurrence of an environment secret, and every URL password, in `text`
    with `"***"`."""
    for secret in env_secrets() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "@" in text:
        text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    return text


def redact(obj: Any) -> Any:
    """A copy of `obj` (nested dicts, lists, tuples, scalars) with secrets replaced by `"***"`.

    Mappings (OmegaConf configs too) come back as dicts, sequences as lists (tuples stay
    tuples), dataclasses as dicts. Non-string scalars are kept as they are; empty or null
    secrets stay empty, so a saved config still shows which secrets were unset.
    """
    return _redact(obj, env_secrets(), under_secret=False)


def _redact(obj: Any, secrets: list[str], under_secret: bool) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):  # dicts, OmegaConf DictConfig
        return {  # keys are scrubbed too: they become tracker parameter names
            (scrub(key, secrets) if isinstance(key, str) else key): _redact(
                value, secrets, is_secret_name(str(key))
            )
            for key, value in obj.items()
        }
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        items = [_redact(item, secrets, under_secret) for item in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, str):
        return REDACTED if under_secret and obj else scrub(obj, secrets)
    return obj


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A copy of a command line with secrets replaced: the value of a secret-named override
    (`++logger.wandb.api_key=...`) or option (`--hf-token X`, `--hf-token=X`), URL
    passwords and environment secrets anywhere."""
    secrets = env_secrets()
    out: list[str] = []
    hide_next = False
    for arg in argv:
        key, sep, _ = arg.partition("=")
        name = key.lstrip("+~-").rsplit(".", 1)[-1]
        if hide_next:
            out.append(REDACTED)
        elif sep and is_secret_name(name):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(scrub(arg, secrets))
        hide_next = not sep and arg.startswith("--") and is_secret_name(name)
    return out


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """`sys.argv` redacted while the block runs (a tracker's init records the command line:
    wandb stored a secret override verbatim in run-*.wandb)."""
    original = list(sys.argv)
    sys.argv[:] = redact_argv(original)
    try:
        yield
    finally:
        sys.argv[:] = original


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs environment secrets from messages and tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = env_secrets()
        message = record.getMessage()
        cleaned = scrub(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Format the traceback now so that the scrubbed text is what handlers print.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, secrets)
        return True


def install_redaction(logger_names: tuple[str, ...] = ("", "sftkit")) -> RedactingFilter:
    """Add one `RedactingFilter` to the named loggers and to all their current handlers.

    Handler filters see records propagated from child loggers (logger filters do not), so
    call this after logging handlers are configured. Calling it twice adds nothing.
    """
    existing = _find_filter(logger_names)
    redactor = existing or RedactingFilter()
    for name in logger_names:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if redactor not in target.filters:
                target.addFilter(redactor)
    return redactor


def _find_filter(logger_names: tuple[str, ...]) -> RedactingFilter | None:
    for name in logger_names:
        for f in logging.getLogger(name).filters:
            if isinstance(f, RedactingFilter):
                return f
    return None
