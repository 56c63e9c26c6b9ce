"""Data: datasets, chat templates, the loss mask, the length policy and the cache.

`load_tokenizer(cfg.policy)` then `prepare_data(cfg, tokenizer)` gives tokenized
`PreparedData` for the training loop.
"""

from sftkit.data.errors import DataError
from sftkit.data.prepare import prepare_data
from sftkit.data.tokenizer import load_tokenizer
from sftkit.data.types import Example, PreparedData

__all__ = ["DataError", "Example", "PreparedData", "load_tokenizer", "prepare_data"]
