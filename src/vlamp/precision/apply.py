"""What a resolved plan does to a model: one walk that stores parameters in their policy's dtype and
puts a precision boundary (forward hooks) on each module whose policy differs from its parent's.

A boundary module with FP32 compute runs with autocast off and its floating inputs cast up to FP32;
one with low-precision compute runs under autocast in that dtype (inputs cast to it when its own
parameters are stored in it). Floating outputs leave in the policy's output dtype. Modules that only
inherit their parent's policy get no hook, so a plan costs nothing where it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlamp.precision.errors import VlampError
from vlamp.precision.plan import Resolved
from vlamp.precision.policy import Policy

_MARK = "_vlamp_policy"
_CALLS = "_vlamp_boundary_calls"  # forward calls counted on each boundary module


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Applies ``fn`` to every tensor in a (nested) tuple/namedtuple/list/dict, keeping the
    structure; anything else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = (map_tensors(v, fn) for v in value)
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """Casts every floating-point tensor in a (nested) tuple/list/dict to ``dtype``."""
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype
                       else t)


class _Boundary:
    """The pre- and post-forward hooks of one boundary module. Contexts are kept on a stack so a
    module called re-entrantly nests correctly; the post hook is registered ``always_call`` so the
    autocast state is restored even when the forward raises."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # Low-precision compute over FP32 weights is autocast's job; otherwise the inputs are cast.
        low = policy.compute != torch.float32
        self.cast_inputs_to = None if low and policy.param != policy.compute else policy.compute
        self.stack: list[torch.autocast] = []

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        setattr(module, _CALLS, getattr(module, _CALLS, 0) + 1)
        low = self.policy.compute != torch.float32
        ctx = torch.autocast(_device_type(module, args, kwargs), dtype=self.policy.compute if low else None,
                             enabled=low)
        ctx.__enter__()
        self.stack.append(ctx)
        if self.cast_inputs_to is not None:
            args, kwargs = cast_floating(args, self.cast_inputs_to), cast_floating(kwargs, self.cast_inputs_to)
        return args, kwargs

    def post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        del module, args
        self.stack.pop().__exit__(None, None, None)
        return cast_floating(output, self.policy.output)


def _device_type(module: nn.Module, args: tuple, kwargs: dict) -> str:
    """Where this call computes: the module's own weights' device, else its first input's (the
    boundary follows a model moved after setup)."""
    for p in module.parameters():
        return p.device.type
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def apply_plan(resolved: Sequence[Resolved]) -> list[RemovableHandle]:
    """Stores each module's own parameters and floating buffers in its policy's ``param`` dtype and
    hooks the boundaries. Returns the hook handles (``handle.remove()`` undoes the hooks).

    Raises:
        VlampError: If the model was already set up by a plan.
    """
    handles: list[RemovableHandle] = []
    for r in resolved:
        if hasattr(r.module, _MARK):
            raise VlampError(f"module {r.name or '(root)'!r} already has a precision plan applied; "
                             "set up each model once")
    for r in resolved:
        m = r.module
        for p in m.parameters(recurse=False):
            if p.dtype != r.policy.param and p.is_floating_point():
                p.data = p.data.to(r.policy.param)
        for key, buf in m.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != r.policy.param:
                setattr(m, key, buf.to(r.policy.param))
        setattr(m, _MARK, r.policy)
        if r.policy != r.parent_policy:
            setattr(m, _CALLS, 0)
            b = _Boundary(r.policy)
            handles.append(m.register_forward_pre_hook(b.pre, with_kwargs=True))
            handles.append(m.register_forward_hook(b.post, always_call=True))
    return handles
