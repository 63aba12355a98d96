"""Proof that precision is what the plan says: record the dtype every compute op actually ran in,
and count the casts a step makes.

A ``TorchDispatchMode`` sees each aten op after autocast has made its casts, so the dtype of its first
floating-point input is the dtype the kernel computes in. Ops are charged to the innermost module
running at the time (tracked with forward hooks on every module).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

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


# The reductions of a norm written out by hand (Hugging Face's RMSNorms: pow, mean, rsqrt), which
# a trace can add to COMPUTE_OPS to see what such a norm computes in.
REDUCTION_OPS = frozenset({"mean", "sum", "var", "var_mean", "pow", "rsqrt"})


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str], seen: dict[str, set[torch.dtype]],
                 ops: frozenset[str] = COMPUTE_OPS) -> None:
        super().__init__()
        self.stack, self.seen, self.ops = stack, seen, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtype = _compute_dtype(func, args, self.ops)
        if self.stack and dtype is not None:
            self.seen[self.stack[-1]].add(dtype)
        return func(*args, **(kwargs or {}))


def _compute_dtype(func, args: tuple, ops: frozenset[str] = COMPUTE_OPS) -> torch.dtype | None:
    """The dtype a compute op (one of ``ops``) runs in: that of its first floating input."""
    if func.overloadpacket.__name__ not in ops:
        return None
    return next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)


def track_modules(model: nn.Module, stack: list[str], *, backward: bool = False,
                  root: str = "") -> list[Any]:
    """Hooks that keep ``stack`` holding the qualified names of the modules running now, innermost
    last (the model itself as ``root``); with ``backward``, through the backward pass too.
    Returns the hook handles (``.remove()`` each)."""
    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: stack.append(name)

    def leave(module: nn.Module, args: object, output: object) -> None:
        stack.pop()  # returns None: the output is left as it is

    def enter_backward(name: str) -> Callable[..., None]:
        return lambda module, grad_output: stack.append(name)

    def leave_backward(module: nn.Module, grad_input: object, grad_output: object) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or root)))
        handles.append(module.register_forward_hook(leave, always_call=True))
        if backward:
            handles.append(module.register_full_backward_pre_hook(enter_backward(name or root)))
            handles.append(module.register_full_backward_hook(leave_backward))
    return handles


def trace_compute_dtypes(model: nn.Module, run: Callable[[], object], *, backward: bool = False,
                         ops: frozenset[str] = COMPUTE_OPS) -> dict[str, set[torch.dtype]]:
    """Runs ``run()`` (which calls ``model``) and returns, per qualified module name (root ``""``),
    the set of dtypes its own compute ops ran in. Modules with no compute op of their own are absent.

    Args:
        model: The model ``run`` calls.
        run: A forward pass, or (with ``backward``) a forward and backward pass.
        backward: Also charge the backward pass's ops to the module whose gradients they compute
            (through full backward hooks), so a module whose gradient kernels run in another dtype
            than its forward is caught too.
        ops: The aten ops that count (default ``COMPUTE_OPS``; add ``REDUCTION_OPS`` for norms
            written out by hand).

    Example:
        >>> seen = trace_compute_dtypes(model, lambda: model(x))  # doctest: +SKIP
        >>> seen["action_out"]
        {torch.float32}
    """
    stack: list[str] = []
    seen: dict[str, set[torch.dtype]] = defaultdict(set)
    handles = track_modules(model, stack, backward=backward)
    try:
        with _Recorder(stack, seen, ops), warnings.catch_warnings():
            # a module whose inputs need no gradient (the first layer) still has its backward
            # charged to it; torch says so for every such module
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # a module returning a ModelOutput gets no backward hook; its ops are charged to the
            # modules inside it, which return tensors
            warnings.filterwarnings("ignore", message="For backward hooks to be called")
            run()
    finally:
        for h in handles:
            h.remove()
    return dict(seen)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.casts = 0
        self.compute: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_") and len(args) >= 1:
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and \
                    src.is_floating_point() and dst.is_floating_point() and src.dtype != dst.dtype:
                self.casts += 1
        elif (dtype := _compute_dtype(func, args)) is not None:
            self.compute[str(dtype).removeprefix("torch.")] += 1
        return out


def count_ops(run: Callable[[], object]) -> dict[str, object]:
    """What ``run()`` (a training step, say) computed: ``casts``, the number of floating-point dtype
    conversions (weights and activations, forward and backward), and ``compute``, the number of
    matmul/convolution/attention/normalization kernels per dtype (``{"bfloat16": 40, ...}``)."""
    with _OpCounter() as counter:
        run()
    return {"casts": counter.casts, "compute": dict(counter.compute)}


def count_casts(run: Callable[[], object]) -> int:
    """The number of floating-point dtype conversions that ``run()`` makes (see :func:`count_ops`)."""
    return int(count_ops(run)["casts"])
