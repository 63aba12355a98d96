"""Proof that precision is what the plan says: record the dtype every compute op actually ran in,
and count the casts a step makes.

A ``TorchDispatchMode`` sees each aten op after autocast has made its casts, so the dtype of its first
floating-point input is the dtype the kernel computes in. Ops are charged to the innermost module
running at the time (tracked with forward hooks on every module).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# The ops whose dtype is "the compute dtype" of a module: matrix products, convolutions,
# attention and normalizations. Elementwise ops follow their inputs and are not counted.
COMPUTE_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "_convolution",
    "native_layer_norm", "native_group_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_fused_rms_norm",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
})


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str], seen: dict[str, set[torch.dtype]]) -> None:
        super().__init__()
        self.stack, self.seen = stack, seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stack and func.overloadpacket.__name__ in COMPUTE_OPS:
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    self.seen[self.stack[-1]].add(a.dtype)
                    break
        return func(*args, **(kwargs or {}))


def trace_compute_dtypes(model: nn.Module, run: Callable[[], object]) -> dict[str, set[torch.dtype]]:
    """Runs ``run()`` (which calls ``model``) and returns, per qualified module name (root ``""``),
    the set of dtypes its own compute ops ran in. Modules with no compute op of their own are absent.

    Example:
        >>> seen = trace_compute_dtypes(model, lambda: model(x))  # doctest: +SKIP
        >>> seen["action_out"]
        {torch.float32}
    """
    stack: list[str] = []
    seen: dict[str, set[torch.dtype]] = defaultdict(set)
    handles = []

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: stack.append(name)

    def leave(module: nn.Module, args: object, output: object) -> None:
        stack.pop()  # returns None: the output is left as it is

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with _Recorder(stack, seen):
            run()
    finally:
        for h in handles:
            h.remove()
    return dict(seen)


class _CastCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_") and len(args) >= 1:
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and \
                    src.is_floating_point() and dst.is_floating_point() and src.dtype != dst.dtype:
                self.count += 1
        return out


def count_casts(run: Callable[[], object]) -> int:
    """The number of floating-point dtype conversions (``fp32 -> bf16`` and back, weights and
    activations, forward and backward) that ``run()`` makes."""
    with _CastCounter() as counter:
        run()
    return counter.count
