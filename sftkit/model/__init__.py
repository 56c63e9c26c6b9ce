"""The policy model: loading, transforms in one fixed order (`build.py`), LoRA, kernels."""

from sftkit.model.deferred import defer_torchao

defer_torchao()  # before anything imports transformers' model code (see deferred.py)
