"""Lean islands: an FP32 island hands on the low-precision dtype where rounding its output is
measured not to matter.

An FP32 island (a norm, a positional or time embedding) computes in FP32 inside a low-precision
model and, as the built-in rules say, hands FP32 on: the element-wise ops after it (SiLU, FiLM,
GELU) then compute in FP32 and save FP32 tensors for the backward, and where its consumer is an
autocast matmul the FP32 output is cast down there anyway. CPU autocast's own norms hand on BF16.
Rounding an island's output costs at most half an ulp per element, once; whether that matters is
measured here on a real batch, as the distance of the loss's gradients from FP32's::

    g_fp32 = the loss's parameter gradients, the model in FP32
    e(S)   = |g_(plan, islands S lean) - g_fp32| / |g_fp32|
    e_mode = e({})                                   the plan's own error (islands hand FP32 on)
    candidates: the islands (FP32 compute and output inside a low-precision parent, decided by a
        built-in or sensitivity rule, not the user's, handing on a non-scalar floating tensor),
        except the model's ends: the action output (what the robot executes) and the loss
    limit  = (1 + tolerance) * e_mode
    if e(all candidates) <= limit: all of them lean                  (three passes in all)
    else: measure each alone; those with e({i}) > limit stay FP32 (their rounding matters by
          itself); of the rest, ordered by e({i}), the longest prefix S with e(S) <= limit,
          found by bisection over its length (the prefix returned was measured)

An island whose every consumer casts to the low dtype anyway changes nothing (``e({i}) == e_mode``
exactly); the others replace one rounding by another more often than they add one, so the error
moves by noise: on TinyVLA in bf16-mixed (batch 64), each GroupNorm alone moved e_mode by -6% to
+5%, and all 24 islands together by -2%, +4%, +20% and +21% on four batches and two plans. The
default tolerance, 25%, sits at the top of that noise (a quarter of the error, a third of a
bit); an island whose rounding matters moves it by far more (TinyVLA's sampled flow times: 12x;
an offset that BF16 cannot hold: ~200x; both tested). Every pass draws the same random numbers
(noise, sampled times); the caller's RNG state is restored after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vlamp.precision.apply import hand_on
from vlamp.precision.dtypes import dtype_name
from vlamp.precision.modes import Mode
from vlamp.precision.plan import BUILTIN_RULES, PrecisionPlan, Resolved, Rule
from vlamp.precision.policy import Policy
from vlamp.precision.probe import (
    LossFn,
    loss_of,
    model_device,
    planned_copy,
    rng_kept,
    state_kept,
    tensors_in,
)

DEFAULT_TOLERANCE = 0.25  # the plan's gradient error may grow by a quarter at most (see above)
LEAN = "+lean:"  # in a lean rule's label, after the label of the rule it leans
# The model's ends: their outputs leave it (the actions a robot executes, the loss); rounding them
# saves nothing a backward keeps and changes what the policy emits. Found by the built-in patterns.
_ENDS = tuple(r for r in BUILTIN_RULES if r.label in ("builtin:action-output", "builtin:loss"))


def islands(plan: PrecisionPlan, model: nn.Module) -> list[Resolved]:
    """The modules ``plan`` keeps in FP32 (compute and output) inside a low-precision parent by a
    rule vlamp made (built-in or sensitivity), but the model's ends: the candidates for a lean
    output."""
    low = plan.mode.compute_dtype
    if low == torch.float32:
        return []
    return _islands(plan.resolve(model, warn_unmatched=False), low)


def _islands(resolved: Sequence[Resolved], low: torch.dtype) -> list[Resolved]:
    return [r for r in resolved
            if r.name and not r.itself and r.parent_policy.compute == low
            and r.policy.compute == torch.float32 and r.policy.output == torch.float32
            and r.decided_by.startswith(("builtin:", "sensitive:"))
            and not any(end.matches(r.name, r.module) for end in _ENDS)]


def _gradients(model: nn.Module, batch: Any, mode: Mode | None, loss_fn: LossFn | None,
               seed: int, watch: dict[str, nn.Module] | None = None) -> list[torch.Tensor]:
    """The loss's gradient with respect to every trained parameter, one tensor each in the
    parameter's dtype (the parameters' ``.grad`` are left alone); ``mode``: under its autocast.
    ``watch``: modules whose forward is checked for handing on a non-scalar floating tensor (those
    that do not are removed)."""
    torch.manual_seed(seed)
    hands_on: set[str] = set()

    def seen(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if any(t.is_floating_point() and t.ndim > 0 for t in tensors_in(output)):
                hands_on.add(name)
        return hook

    handles = [m.register_forward_hook(seen(n)) for n, m in (watch or {}).items()]
    try:
        if mode is None:
            loss = loss_of(model, batch, loss_fn)
        else:
            with mode.autocast(model_device(model).type):
                loss = loss_of(model, batch, loss_fn)
    finally:
        for h in handles:
            h.remove()
    for name in set(watch or ()) - hands_on:
        del watch[name]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return []
    grads = torch.autograd.grad(loss.float(), params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _relative(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``|a - b| / |b|`` over all the tensors, in FP32 one tensor at a time (no flattened copy of a
    model's gradients); infinite where either holds a non-finite value (an overflow)."""
    norm = diff = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.float(), y.float()
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            return math.inf
        norm += float(torch.linalg.vector_norm(y)) ** 2
        diff += float(torch.linalg.vector_norm(x - y)) ** 2
    return math.sqrt(diff) / math.sqrt(norm) if norm > 0 else math.sqrt(diff)


def measure_lean(model: nn.Module, batch: Any, plan: PrecisionPlan, *,
                 tolerance: float = DEFAULT_TOLERANCE, loss_fn: LossFn | None = None,
                 seed: int = 0, log: Callable[[str], None] | None = None,
                 freeze: Sequence[str] = ()) -> tuple[list[Rule], dict[str, Any]]:
    """Which of ``plan``'s FP32 islands may hand on the low-precision dtype (see the module's text).
    ``model`` is not changed: its FP32 pass runs on it (buffers put back), the others on one copy.

    Args:
        model: The plain model (no plan applied).
        batch: A real batch; ``loss_fn(model, batch)`` (default ``model(batch)``) is the loss.
        plan: The plan whose islands are tried.
        tolerance: How much the plan's gradient error may grow (0.25: by a quarter); 0 leans
            only islands whose rounding changes nothing.
        loss_fn: How to get the loss from the model and the batch.
        seed: The RNG seed every pass starts from.
        log: Called with one line before the passes start (not at all without islands).
        freeze: Modules the run freezes (as :class:`~vlamp.precision.mixed_precision.MixedPrecision`
            takes them): frozen and stored as the run stores them in every pass.

    Returns:
        One rule per lean island (the island's policy with a low-precision output; place them
        after the user's rules), and a record: ``tolerance``, ``dtype``, ``mode_error`` (e_mode),
        ``lean_error`` (with the lean islands) and, per island, ``class``, ``lean`` and
        ``error_alone`` (``None`` where all islands together were within the tolerance).
    """
    low = plan.mode.compute_dtype
    record: dict[str, Any] = {"tolerance": tolerance, "dtype": dtype_name(low), "islands": {}}
    if not islands(plan, model):
        return [], record
    if log is not None:
        log(f"precision: measuring which FP32 islands may hand on {dtype_name(low)} (gradient "
            f"error within +{tolerance:.0%})...")
    with rng_kept():
        with state_kept(model, freeze):
            g_fp32 = _gradients(model, batch, None, loss_fn, seed)
        probe, resolved = planned_copy(model, plan, freeze)
        candidates = {r.name: r for r in _islands(resolved, low)}
        ran = {name: r.module for name, r in candidates.items()}
        # (each pass's gradients are let go once compared: only g_fp32 lives beside the next pass)
        e_mode = _relative(_gradients(probe, batch, plan.mode, loss_fn, seed, watch=ran), g_fp32)

        def error(lean: Sequence[str]) -> float:
            for name in lean:
                hand_on(ran[name], low)
            try:
                return _relative(_gradients(probe, batch, plan.mode, loss_fn, seed), g_fp32)
            finally:
                for name in lean:
                    hand_on(ran[name], torch.float32)

        limit = (1 + tolerance) * e_mode
        alone: dict[str, float | None] = dict.fromkeys(ran)
        lean, e_lean = list(ran), error(list(ran))
        if e_lean > limit:
            alone = {name: error([name]) for name in ran}
            order = sorted((n for n in ran if alone[n] <= limit), key=alone.__getitem__)
            lean, e_lean = _longest_prefix(order, error, limit, e_mode)
    record.update(mode_error=e_mode, lean_error=e_lean, islands={
        name: {"class": type(candidates[name].module).__name__, "error_alone": alone[name],
               "lean": name in lean} for name in ran})
    rules = [Rule(name, Policy(candidates[name].policy.param, torch.float32, low),
                  f"{candidates[name].decided_by}{LEAN}{dtype_name(low)}") for name in lean]
    return rules, record


def _longest_prefix(order: Sequence[str], error: Any, limit: float, e_mode: float
                    ) -> tuple[list[str], float]:
    """The longest prefix of ``order`` whose measured ``error`` is within ``limit`` (bisection over
    its length; the empty prefix's error is ``e_mode``), and that error."""
    whole = error(order) if order else e_mode
    if whole <= limit:
        return list(order), whole
    good, good_error, bad = 0, e_mode, len(order)
    while bad - good > 1:
        mid = (good + bad) // 2
        e = error(order[:mid])
        if e <= limit:
            good, good_error = mid, e
        else:
            bad = mid
    return list(order[:good]), good_error


def lean_plan(plan: PrecisionPlan, rules: Sequence[Rule], record: dict[str, Any]) -> PrecisionPlan:
    """``plan`` with the lean ``rules`` after its own (user rules stay first) and the record kept in
    ``plan.measured["lean"]``."""
    measured = dict(plan.measured or {})
    measured["lean"] = record
    return PrecisionPlan(plan.mode, (*plan.user_rules, *rules), builtin_rules=plan.builtin_rules,
                         measured=measured)
