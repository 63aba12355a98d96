"""Frozen modules: no gradients, no optimizer state, and weights stored in low precision.

A frozen module's weights are never updated, so nothing is lost by storing them in the mode's
compute dtype even in a ``-mixed`` mode, whose trained weights stay FP32: a frozen vision tower
in bf16-mixed holds 2 bytes per parameter instead of 16. Its FP32 islands (norms, positional
embeddings) keep FP32, as everywhere. Modules are chosen by the patterns plan rules use: a
qualified name or a class name, with ``*`` globs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlamp.precision.errors import VlampError
from vlamp.precision.modes import Mode
from vlamp.precision.plan import PrecisionPlan, Rule
from vlamp.precision.policy import Policy

FROZEN = "frozen"  # the label of the rules freezing adds


def frozen_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """The modules ``patterns`` name (outermost matches; their descendants are frozen with them).

    Raises:
        VlampError: For a pattern that matches no module, naming the model's top-level modules.
    """
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        rule = Rule(pattern, "fp32")
        hits = {n: m for n, m in model.named_modules() if n and rule.matches(n, m)}
        if not hits:
            top = ", ".join(n for n, _ in model.named_children())
            raise VlampError(f"freeze: {pattern!r} matches no module of {type(model).__name__}; "
                             f"its modules include {top}")
        found.update(hits)
    return {n: m for n, m in found.items()
            if not any(n.startswith(o + ".") for o in found if o != n)}


def freeze(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Turns off the gradients of the modules ``patterns`` name; returns them by name."""
    frozen = frozen_modules(model, patterns)
    for module in frozen.values():
        module.requires_grad_(False)
    return frozen


def frozen_rules(names: Sequence[str], mode: Mode) -> list[Rule]:
    """Rules storing the frozen modules in ``mode``'s compute dtype where the mode would keep their
    weights in FP32 (the ``-mixed`` modes); none elsewhere."""
    low = mode.compute_dtype
    if low == torch.float32 or mode.default_policy.param != torch.float32:
        return []
    return [Rule(name, Policy(low, low, low), FROZEN) for name in names]


def with_frozen(plan: PrecisionPlan, names: Sequence[str]) -> PrecisionPlan:
    """``plan`` with the storage rules of the frozen modules ``names`` after its user rules (those
    it holds already, as a checkpoint's saved plan does, once)."""
    extra = [r for r in frozen_rules(names, plan.mode) if r not in plan.user_rules]
    if not extra:
        return plan
    return PrecisionPlan(plan.mode, [*plan.user_rules, *extra], builtin_rules=plan.builtin_rules,
                         measured=plan.measured)


__all__ = ["FROZEN", "freeze", "frozen_modules", "frozen_rules", "with_frozen"]
