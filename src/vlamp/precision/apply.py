"""What a resolved plan does to a model: one walk that stores parameters in their policy's dtype and
puts a precision boundary on each module whose policy differs from its parent's.

A boundary module with FP32 compute runs with autocast off and its floating inputs cast up to FP32;
one with low-precision compute runs under autocast in that dtype (inputs cast to it when its own
parameters are stored in it). Floating outputs leave in the policy's output dtype. Modules that only
inherit their parent's policy are left alone, so a plan costs nothing where it changes nothing —
except modules whose own weights are stored in low precision and compute in FP32
(``params=bf16,compute=fp32``, the ``bf16-storage`` mode): for its forward, each such module's
weights (and those of its descendants, which a parent such as ``MultiheadAttention`` may use
directly) are cast up to FP32, and the ops save the stored BF16 weight for the backward instead of
the FP32 copy (:mod:`vlamp.precision.saved`), so the copies live only while the module computes.

A boundary is the module's own ``forward`` run inside a ``with torch.autocast(...)`` block: the
module's class is swapped for a subclass of it (same name, same state dict, ``isinstance`` still
true) whose ``forward`` does that, as ``torch.distributed.fsdp.fully_shard`` does. A plain ``with``
block, unlike an autocast entered in a pre-hook and left in a post-hook, is what ``torch.compile``
can trace, and the autocast state is restored however the forward ends.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vlamp.precision.errors import VlampError
from vlamp.precision.plan import Resolved
from vlamp.precision.policy import Policy
from vlamp.precision.saved import Upcasts, saving_low_precision

_MARK = "_vlamp_policy"
_CALLS = "_vlamp_boundary_calls"  # forward calls counted on each boundary module


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Applies ``fn`` to every tensor in a (nested) tuple/namedtuple/list/dict/dataclass, keeping
    the structure and the container's type (a dict subclass such as Hugging Face's
    ``ModelOutput`` stays one, attribute access included); anything else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = (map_tensors(v, fn) for v in value)
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        mapped = {k: map_tensors(v, fn) for k, v in value.items()}
        if type(value) is dict:
            return mapped
        out = copy.copy(value)  # the subclass, its attributes kept; entries replaced in place
        for k, v in mapped.items():
            out[k] = v
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """Casts every floating-point tensor in a (nested) tuple/list/dict to ``dtype``."""
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype
                       else t)


_BOUNDARY = "_vlamp_boundary"
_SWAPPED: dict[type, type] = {}  # module class -> its boundary subclass


class _Boundary:
    """What one boundary module does around its forward."""

    def __init__(self, policy: Policy, module: nn.Module) -> None:
        self.policy = policy
        # Low-precision compute over FP32 weights is autocast's job; otherwise the inputs are cast.
        self.low = policy.compute != torch.float32
        self.cast_inputs_to = None if self.low and policy.param != policy.compute else policy.compute
        # Low-precision storage computing in FP32: the weights are cast up for the forward. Not an
        # embedding's: a lookup is exact in any dtype, so its rows are looked up where they are
        # stored and the output cast (a 257k-word table is not copied to FP32 on every forward).
        self.upcast_weights = (not self.low and policy.param != torch.float32
                               and not isinstance(module, nn.Embedding))
        self.stored_low: list[tuple[nn.Module, str]] = []  # set by apply_plan

    def __call__(self, forward: Callable[..., Any], module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not torch.compiler.is_compiling():  # a compiled graph would guard on the count
            setattr(module, _CALLS, getattr(module, _CALLS, 0) + 1)
        upcasts = Upcasts()
        if self.cast_inputs_to is not None:
            to = self.cast_inputs_to

            def cast(t: torch.Tensor) -> torch.Tensor:
                return upcasts.cast(t, to) if t.is_floating_point() and t.dtype != to else t
            args, kwargs = map_tensors(args, cast), map_tensors(kwargs, cast)
        device_type = _device_type(module, args, kwargs)
        swapped = _upcast_weights(self.stored_low, upcasts) if self.upcast_weights else []
        try:
            with torch.autocast(device_type, dtype=self.policy.compute if self.low else None,
                                enabled=self.low), \
                    saving_low_precision(upcasts):  # an FP32 island saves what it got, not its copy
                output = forward(module, *args, **kwargs)
        finally:
            for owner, name, p in swapped:
                owner._parameters[name] = p
            # Autograd keeps each saved tensor's pack hook (and so ``upcasts``) until the backward
            # frees it: without this, every FP32 copy made here would live until then.
            upcasts.clear()
        return cast_floating(output, self.policy.output)


# Modules known to compute with their children's weights without calling the children
# (``MultiheadAttention`` reads ``out_proj.weight``): their boundary casts the whole subtree.
READS_CHILDREN = (nn.MultiheadAttention,)


def _stored_low(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, name) of every low-precision parameter a boundary at ``module`` casts up: its own,
    those of descendants that have no boundary of their own (their weights are used inside this
    forward), and all of its subtree's for a module of :data:`READS_CHILDREN`. Descendants with a
    boundary cast their own when they run, so no more than one module's weights are held in FP32
    at a time (casting a 3 B-parameter model's whole tree from its root would copy 13 GB)."""
    whole = isinstance(module, READS_CHILDREN)
    owners = [module, *(m for m in module.modules()
                        if m is not module and (whole or not hasattr(m, _BOUNDARY)))]
    return [(owner, name) for owner in owners for name, p in owner._parameters.items()
            if p is not None and p.dtype in (torch.bfloat16, torch.float16)]


def _upcast_weights(stored: list[tuple[nn.Module, str]], upcasts: Upcasts
                    ) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Puts FP32 copies of the ``stored`` parameters in their place (differentiable casts: the
    gradients reach the stored parameters), skipping those an enclosing boundary already cast;
    returns what to put back."""
    swapped = []
    for owner, name in stored:
        p = owner._parameters[name]
        if p.dtype != torch.float32:
            swapped.append((owner, name, p))
            owner._parameters[name] = upcasts.cast(p, torch.float32)
    return swapped


def _boundary_class(cls: type) -> type:
    """The subclass of ``cls`` whose ``forward`` runs ``cls.forward`` inside the instance's boundary."""
    if getattr(cls, "_vlamp_boundary_of", None) is not None:
        return cls  # already one: the instance's boundary object is replaced instead
    sub = _SWAPPED.get(cls)
    if sub is None:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, _BOUNDARY)(cls.forward, self, args, kwargs)

        sub = type(cls.__name__, (cls,), {"forward": forward, "__qualname__": cls.__qualname__,
                                          "__module__": cls.__module__, "_vlamp_boundary_of": cls})
        _SWAPPED[cls] = sub
    return sub


class Undo:
    """Takes the boundaries a plan put on a model off again (weights keep their dtypes)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for m in self.modules:
            m.__class__ = type(m)._vlamp_boundary_of
            for name in (_BOUNDARY, _CALLS):
                m.__dict__.pop(name, None)


def _device_type(module: nn.Module, args: tuple, kwargs: dict) -> str:
    """Where this call computes: the module's own weights' device, else its first input's (the
    boundary follows a model moved after setup)."""
    for p in module.parameters():
        return p.device.type
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def apply_plan(resolved: Sequence[Resolved]) -> Undo:
    """Stores each module's own parameters and floating buffers in its policy's ``param`` dtype and
    puts the boundaries on. Returns an :class:`Undo` (``.remove()`` takes the boundaries off).

    Raises:
        VlampError: If the model was already set up by a plan.
    """
    for r in resolved:
        if hasattr(r.module, _MARK):
            raise VlampError(f"module {r.name or '(root)'!r} already has a precision plan applied; "
                             "set up each model once")
    bounded: list[nn.Module] = []
    for r in resolved:
        m = r.module
        for p in m.parameters(recurse=False):
            if p.dtype != r.policy.param and p.is_floating_point():
                p.data = p.data.to(r.policy.param)
        for key, buf in m.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != r.policy.param:
                setattr(m, key, buf.to(r.policy.param))
        setattr(m, _MARK, r.policy)
        stored_low = r.policy.param != torch.float32 and r.policy.compute == torch.float32 and any(
            True for _ in m.parameters(recurse=False))
        if r.policy != r.parent_policy or stored_low:
            setattr(m, _CALLS, 0)
            setattr(m, _BOUNDARY, _Boundary(r.policy, m))
            m.__class__ = _boundary_class(type(m))
            bounded.append(m)
    for m in bounded:  # every weight has its dtype now: where each subtree's low ones are, once
        if getattr(m, _BOUNDARY).upcast_weights:
            getattr(m, _BOUNDARY).stored_low = _stored_low(m)
    return Undo(bounded)


def hand_on(module: nn.Module, dtype: torch.dtype) -> None:
    """Makes a boundary module of an applied plan hand its floating outputs on in ``dtype`` (a
    measurement's what-if: :mod:`vlamp.precision.lean` tries each island's output in low precision
    without applying the plan again to a fresh copy of the model)."""
    boundary = getattr(module, _BOUNDARY)
    boundary.policy = dataclasses.replace(boundary.policy, output=dtype)
    setattr(module, _MARK, boundary.policy)


def uncalled_boundaries(resolved: Sequence[Resolved]) -> dict[str, str] | None:
    """Ruled modules whose own forward never ran (their parent uses their weights directly, as
    ``MultiheadAttention`` does with ``out_proj``): name -> the rule that decided them. ``None``
    when nothing was counted at all (a compiled forward counts nothing)."""
    bounded = [r for r in resolved if r.policy != r.parent_policy and r.name]
    if not any(getattr(r.module, _CALLS, 1) for r in bounded):
        return None
    return {r.name: r.decided_by for r in bounded if getattr(r.module, _CALLS, 1) == 0}
