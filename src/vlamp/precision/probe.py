"""Probing a model: where it lives, what a forward pass hands each module, the loss of a batch.

The measurements of :mod:`vlamp.precision.autoplan` (speed), :mod:`vlamp.precision.lean` and
:mod:`vlamp.precision.sensitivity` (accuracy) and the trainer's policy wrapper share these.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vlamp.precision.apply import apply_plan, map_tensors
from vlamp.precision.freeze import freeze as freeze_modules
from vlamp.precision.freeze import frozen_modules, with_frozen
from vlamp.precision.plan import PrecisionPlan, Resolved

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device if first is not None else torch.device("cpu")


def loss_of(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """``loss_fn(model, batch)``, or ``model(batch)`` without one."""
    return loss_fn(model, batch) if loss_fn is not None else model(batch)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (nested tuples, lists, dicts, dataclasses), in order."""
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


def leaf_copy(value: Any) -> Any:
    """Detached copies of captured inputs; those that needed a gradient become leaves that do."""
    return map_tensors(value, lambda t: t.detach().clone().requires_grad_(
        t.requires_grad and t.is_floating_point()))


def capture_inputs(model: nn.Module, batch: Any, modules: Mapping[str, nn.Module],
                   loss_fn: LossFn | None = None) -> dict[str, tuple[tuple, dict]]:
    """Runs one forward pass of ``model`` (in the caller's autocast context, autograd on, so inputs
    that need a gradient say so) and returns detached copies of the first inputs each of
    ``modules`` received (by name; modules never called are absent)."""
    inputs: dict[str, tuple[tuple, dict]] = {}

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.setdefault(name, (leaf_copy(args), leaf_copy(kwargs)))
        return hook

    handles = [m.register_forward_pre_hook(capture(n), with_kwargs=True) for n, m in modules.items()]
    try:
        loss_of(model, batch, loss_fn)
    finally:
        for h in handles:
            h.remove()
    return inputs


class rng_kept:
    """Measuring draws random numbers (noise, sampled times); the caller's RNG state is restored so
    a measured run trains exactly like an unmeasured one."""

    def __enter__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class state_kept:
    """Runs FP32 passes on the caller's model itself, where a copy would hold a second set of its
    weights: what a forward and backward change in it (buffers such as BatchNorm's running
    statistics, the parameters' ``.grad``) is put back on exit, and what the passes set (a frozen
    module's ``requires_grad``, by ``freeze``). Inside, every ``.grad`` starts ``None``; the
    weights are the caller's to leave alone (no optimizer step)."""

    def __init__(self, model: nn.Module, freeze: Sequence[str] = ()) -> None:
        self.model, self.freeze = model, freeze

    def __enter__(self) -> nn.Module:
        self.grads = [(p, p.grad, p.requires_grad) for p in self.model.parameters()]
        self.buffers = [(m, name, b, b.detach().clone()) for m in self.model.modules()
                        for name, b in m._buffers.items() if b is not None]
        for p, _, _ in self.grads:
            p.grad = None
        try:
            freeze_modules(self.model, self.freeze)
        except BaseException:
            self.__exit__()
            raise
        return self.model

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, name, original, saved in self.buffers:
                original.copy_(saved)
                m._buffers[name] = original  # (a forward may have put another tensor there)
        for p, grad, requires_grad in self.grads:
            p.grad = grad
            p.requires_grad_(requires_grad)


def planned_copy(model: nn.Module, plan: PrecisionPlan, freeze: Sequence[str] = ()
                 ) -> tuple[nn.Module, list[Resolved]]:
    """A copy of ``model`` set up as a run with ``plan`` that freezes ``freeze`` trains it: those
    modules frozen and stored as :class:`~vlamp.precision.mixed_precision.MixedPrecision` stores
    them, the plan applied; and the plan resolved on it. ``model`` is not changed.

    The copy's tensors are made in their planned dtype: a copy made first in FP32 and cast after
    would hold a second FP32 set of the weights for a moment (the peak of a measurement of a
    large model with low-precision storage, a frozen tower in a ``-mixed`` mode)."""
    planned = with_frozen(plan, list(frozen_modules(model, freeze)))  # (names: the copy's too)
    probe = copy.deepcopy(model, memo=_cast_in_advance(planned.resolve(model, warn_unmatched=False)))
    freeze_modules(probe, freeze)
    resolved = planned.resolve(probe, warn_unmatched=False)
    apply_plan(resolved)
    return probe, resolved


def _cast_in_advance(resolved: Sequence[Resolved]) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo holding, for each floating parameter and buffer that ``resolved``
    stores in another dtype, its copy in that dtype (what :func:`apply_plan` would make of it)."""
    memo: dict[int, Any] = {}
    for r in resolved:
        dtype = r.policy.param
        for p in r.module.parameters(recurse=False):
            if type(p) is nn.Parameter and p.is_floating_point() and p.dtype != dtype:
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for b in r.module.buffers(recurse=False):
            if type(b) is torch.Tensor and b.is_floating_point() and b.dtype != dtype:
                memo[id(b)] = b.detach().to(dtype)
    return memo
