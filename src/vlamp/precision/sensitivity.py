"""The accuracy half of a measured plan: how much error each module's low precision adds.

Each leaf module is fed the inputs it receives in an FP32 forward pass of a real batch, once as it
would run in the mode's low precision (the mode's default policy as a boundary: autocast, and for
the ``-true`` modes weights, buffers and inputs in low precision) and once in FP32; the same
upstream gradient is sent back through both. The module's error is the relative difference of its
outputs, and of its gradients (parameters and inputs), against the FP32 run:
``|low - fp32| / |fp32|`` over all elements. Upstream error is not included: every module starts
from the same FP32 inputs, so each number is the module's own contribution.

:func:`sensitivity_plan` keeps in FP32 the modules whose error passes a threshold and puts every
other module in low precision, with no built-in rule: a plan chosen from measured error alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlamp.precision.apply import apply_plan
from vlamp.precision.dtypes import dtype_name
from vlamp.precision.modes import Mode, get_mode
from vlamp.precision.plan import PrecisionPlan, Resolved, Rule
from vlamp.precision.policy import FP32
from vlamp.precision.probe import (
    LossFn,
    capture_inputs,
    leaf_copy,
    model_device,
    state_kept,
    tensors_in,
)

DEFAULT_THRESHOLD = 0.02  # 2% relative error: several times bf16's rounding (2^-9) in a matmul


def _relative(low: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    pairs = [(a.float(), b.float()) for a, b in zip(low, ref) if a is not None and b is not None]
    if not pairs:
        return 0.0
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in pairs))
    norm = torch.sqrt(sum((b ** 2).sum() for _, b in pairs))
    return float(diff / norm) if float(norm) > 0 else float(diff)


def _run(module: nn.Module, args: tuple, kwargs: dict, device_type: str, seed: int,
         upstream: Callable[[list[torch.Tensor]], list[torch.Tensor]]
         ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Forward with autocast off (a low-precision module's own boundary turns it on), the RNG
    seeded with ``seed`` so a module that draws noise draws the same in both runs, then backward
    of ``upstream(outputs)``. Returns outputs, parameter gradients, input gradients and the
    upstream gradient used."""
    torch.manual_seed(seed)
    args, kwargs = leaf_copy((args, kwargs))
    with torch.autocast(device_type, enabled=False):
        output = module(*args, **kwargs)
    outs = [t for t in tensors_in(output) if t.is_floating_point()]
    grads = upstream(outs)
    live = [(t, g) for t, g in zip(outs, grads) if t.requires_grad]
    if live:
        torch.autograd.backward([t for t, _ in live], [g.to(t.dtype) for t, g in live])
    params = [p.grad for p in module.parameters()]
    inputs = [t.grad for t in tensors_in((args, kwargs)) if t.is_floating_point() and t.requires_grad]
    return [t.detach() for t in outs], params, inputs, grads


def measure_sensitivity(model: nn.Module, batch: Any, mode: str | Mode, *,
                        loss_fn: LossFn | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per leaf module that ran in the forward pass: its class, the low dtype, and the relative
    error of its output (``output_error``) and gradients (``grad_error``) in the mode's low
    precision against FP32. The model is not changed (its buffers are put back after the FP32 pass;
    each module's passes run on copies of it); the caller's RNG is kept.

    Args:
        model: A plain model (no plan applied).
        batch: A real batch; ``loss_fn(model, batch)`` (default ``model(batch)``) is the loss.
        mode: A low-precision mode (``bf16-mixed``, ``fp16-true``, ...).
    """
    m = get_mode(mode)
    low = m.default_policy
    device = model_device(model)
    rng = torch.get_rng_state()
    leaves = {n: mod for n, mod in model.named_modules() if n and next(mod.children(), None) is None}
    with state_kept(model):  # FP32: every module gets true inputs (on the model, not a copy)
        inputs = capture_inputs(model, batch, leaves, loss_fn)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, Any]] = {}
    for name, (args, kwargs) in inputs.items():
        def draw(outs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.randn(t.shape, generator=generator).to(device) for t in outs]

        ref_out, ref_params, ref_inputs, upstream = _run(copy.deepcopy(leaves[name]), args, kwargs,
                                                         device.type, seed, draw)
        low_module = copy.deepcopy(leaves[name])  # its boundary decides its precision
        apply_plan([Resolved("", low_module, low, "sensitivity", FP32)])
        low_out, low_params, low_inputs, _ = _run(low_module, args, kwargs, device.type, seed,
                                                  lambda outs, g=upstream: g)
        out[name] = {"class": type(leaves[name]).__name__, "dtype": dtype_name(m.compute_dtype),
                     "params": sum(p.numel() for p in leaves[name].parameters()),
                     "output_error": _relative(low_out, ref_out),
                     "grad_error": _relative(low_params + low_inputs, ref_params + ref_inputs)}
    torch.set_rng_state(rng)
    return out


def sensitivity_plan(model: nn.Module, batch: Any, mode: str | Mode, *,
                     threshold: float = DEFAULT_THRESHOLD, loss_fn: LossFn | None = None
                     ) -> tuple[PrecisionPlan, dict[str, dict[str, Any]]]:
    """A plan from measured error alone: FP32 for each module whose output or gradient error in
    low precision passes ``threshold``, low precision for the rest, no built-in rules.

    Returns:
        The plan and :func:`measure_sensitivity`'s table (with ``kept_fp32`` per module).
    """
    m = get_mode(mode)
    table = measure_sensitivity(model, batch, m, loss_fn=loss_fn)
    rules = []
    for name, row in table.items():
        worst = max(row["output_error"], row["grad_error"])
        row["kept_fp32"] = worst > threshold
        if row["kept_fp32"]:
            rules.append(Rule(name, FP32, label=f"sensitive:{row['dtype']} error {worst:.1e} > {threshold:g}"))
    plan = PrecisionPlan(m, rules, builtin_rules=False)
    return plan, table
