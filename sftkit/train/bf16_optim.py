"""AdamW for bfloat16 parameters that keeps the small updates round-to-nearest loses.

A bf16 parameter has 8 significant bits: an update smaller than half a unit in the last
place (|update| < |w| * 2**-9, e.g. lr 1e-5 on a weight of 0.02) rounds back to the old
value, so at SFT learning rates pure bf16 training stalls. Two fixes, both opt-in through
`policy.dtensor_cfg.bf16_params_update` (`rounding` here):

- ``stochastic_rounding``: the float32 result is rounded up or down at random with the
  probability that makes the rounding unbiased (E[round(x)] = x), so many small updates add
  up in expectation. No extra memory. The random bits come from a generator seeded by
  (seed, optimizer step, chunk, rank), so a resumed run rounds exactly as the uninterrupted
  one: no generator state to checkpoint.
- ``kahan``: a bf16 compensation buffer per parameter keeps what rounding dropped and adds
  it back at the next step (Kahan summation), so the parameter tracks float32 master weights
  to about 16 bits. Costs 2 bytes per parameter (float32 masters cost 4).

The moments are float32 (8 bytes per parameter), as with float32 master weights. The update
is torch's AdamW formula computed in float32 on the upcast parameter, with foreach kernels
over chunks of at most `CHUNK_NUMEL` elements (bounded temporaries on an 8B model); torch's
single fused AdamW kernel cannot be used because it rounds to nearest inside the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

ROUNDINGS = ("nearest", "stochastic_rounding", "kahan")
CHUNK_NUMEL = 1 << 28  # float32 temporaries of at most 1 GiB each per chunk
_LOW_BITS = 1 << 16  # float32 bits below bf16's mantissa
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """Write `value` (float32) into `out` (bf16), rounded up with probability equal to the
    fraction of the bf16 step it lies above the value below it (unbiased).

    Adding uniform random 16-bit noise to the float32 bit pattern and dropping the low 16
    bits carries into the kept bits with exactly that probability (the bit pattern is the
    magnitude, so this holds for negative values too). Infinities stay infinite.
    """
    noise = torch.randint(
        0, _LOW_BITS, value.shape, dtype=torch.int32, device=value.device, generator=generator
    )
    bits = value.view(torch.int32).add_(noise).bitwise_and_(_HIGH_MASK)
    out.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias, under no_grad), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class BF16AdamW(torch.optim.Optimizer):
    """Adam/AdamW over bf16 (or any dtype) parameters with float32 moments and a chosen
    rounding of the float32 update back to the parameter dtype (see the module docstring).

    Takes torch.optim.AdamW's arguments; `foreach`/`fused` are accepted and ignored (the
    step is always chunked foreach), `amsgrad`, `capturable` and `differentiable` are not
    supported. `decoupled_weight_decay=False` gives torch.optim.Adam's L2 weight decay.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rounding: str = "stochastic_rounding",
        seed: int = 0,
        decoupled_weight_decay: bool = True,
        maximize: bool = False,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if amsgrad or capturable or differentiable:
            raise ValueError(
                "amsgrad, capturable and differentiable are not supported with bf16 parameter "
                "updates; drop them from policy.optimizer.kwargs"
            )
        del foreach, fused  # always the chunked foreach step
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.rounding = rounding
        self.seed = seed

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if self.rounding == "kahan":
                state["compensation"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for index, chunk in enumerate(_chunks(params)):
                self._update_chunk(group, chunk, index)
        return loss

    def _update_chunk(self, group: dict[str, Any], params: list[torch.Tensor], index: int) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        states = [self._state_for(p) for p in params]
        for s in states:
            s["step"] += 1
        steps = [float(s["step"]) for s in states]
        local = [_local(p) for p in params]
        exp_avg = [_local(s["exp_avg"]) for s in states]
        exp_avg_sq = [_local(s["exp_avg_sq"]) for s in states]
        master = [t.float() if t.dtype != torch.float32 else t.clone() for t in local]
        if self.rounding == "kahan":
            torch._foreach_add_(master, [_local(s["compensation"]).float() for s in states])
        grads = [_local(p.grad).float() for p in params]  # type: ignore[arg-type]
        # Out of place: `.float()` of a float32 gradient is the gradient itself.
        if group["maximize"]:
            grads = list(torch._foreach_neg(grads))
        if wd and not group["decoupled_weight_decay"]:
            grads = list(torch._foreach_add(grads, master, alpha=wd))
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        del grads
        if wd and group["decoupled_weight_decay"]:
            torch._foreach_mul_(master, 1 - lr * wd)
        # torch's AdamW: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**n) for n in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(master, exp_avg, denom, [-lr / (1 - beta1**n) for n in steps])
        del denom
        self._write_back(local, master, states, steps[0], index)

    def _write_back(
        self,
        local: list[torch.Tensor],
        master: list[torch.Tensor],
        states: list[dict[str, Any]],
        step: float,
        index: int,
    ) -> None:
        """Round the float32 results into the parameters (and keep Kahan's remainder)."""
        if self.rounding == "stochastic_rounding":
            generator = torch.Generator(device=local[0].device)
            # Any fixed mixing works: distinct (step, chunk, rank) give distinct streams.
            mixed = ((self.seed * 1_000_003 + int(step)) * 10_007 + index) * 65_537 + _rank()
            generator.manual_seed(mixed % 2**63)
            for out, value in zip(local, master, strict=True):
                if out.dtype == torch.bfloat16:
                    stochastic_round_(out, value, generator)
                else:
                    out.copy_(value)
            return
        torch._foreach_copy_(local, master)
        if self.rounding == "kahan":
            rounded = [t.float() for t in local]
            torch._foreach_sub_(master, rounded)
            torch._foreach_copy_([_local(s["compensation"]) for s in states], master)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating-point state to the parameter dtype on load; the moments and
        compensation keep the dtype they were saved in, so resuming is bit-exact."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for param_id, p in zip(ids, params, strict=True):
            for key, value in saved.get(param_id, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device)


def _chunks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of parameters on one device, each under CHUNK_NUMEL elements (a
    larger parameter is a chunk of its own)."""
    chunks: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        n = _local(p).numel()
        if chunks and size + n <= CHUNK_NUMEL and _local(chunks[-1][0]).device == _local(p).device:
            chunks[-1].append(p)
            size += n
        else:
            chunks.append([p])
            size = n
    return chunks
