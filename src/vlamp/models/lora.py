"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on a model's linear layers.

``add_lora`` replaces each chosen ``nn.Linear`` by a :class:`LoRALinear`: the original layer,
frozen, as ``.base``, plus two small trained factors, ``y = base(x) + B(A(x)) * alpha / rank``, with
``B`` starting at zero so the adapted model starts as the original. The precision plan then stores
the frozen base weights in the mode's low precision (``train.lora`` freezes ``*.base``: see
:mod:`vlamp.precision.freeze`) while the adapters train as every other weight of the mode does.

``merge_lora`` folds the adapters back into plain linear layers, in FP32 (a merge rounded to BF16
loses the small adapter product, the failure openvla-oft#151 reports), so a merged checkpoint is an
ordinary model that ``vlamp eval`` loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vlamp.precision.errors import VlampError
from vlamp.precision.plan import Rule


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trained low-rank update.

    Args:
        base: The layer adapted; frozen here.
        rank: The update's rank.
        alpha: Its scale is ``alpha / rank``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain FP32 linear layer computing what this one does: ``W + scale * B A``."""
        w = self.base.weight.float() + self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device)
        out.weight.copy_(w)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias.float())
        return out


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> list[str]:
    """Replaces the linear layers ``targets`` names (qualified names or class names, globs, as
    precision rules take them) with :class:`LoRALinear`; returns their names, in the model's order.

    Raises:
        VlampError: On a rank below 1, or a target that matches no linear layer.
    """
    if rank < 1:
        raise VlampError(f"lora: rank must be >= 1, got {rank}")
    chosen: list[str] = []
    for pattern in targets:
        rule = Rule(pattern, "fp32")
        hits = [n for n, m in model.named_modules() if type(m) is nn.Linear and n and rule.matches(n, m)]
        if not hits:
            raise VlampError(f"lora: target {pattern!r} matches no linear layer of "
                             f"{type(model).__name__} (e.g. {_some_linears(model)})")
        chosen += [n for n in hits if n not in chosen]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    chosen.sort(key=order.__getitem__)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha))
    return chosen


def frozen_bases(adapted: Sequence[str]) -> list[str]:
    """The freeze patterns of the adapted layers' original weights (``train.freeze``'s form):
    what :func:`add_lora`'s layers leave untrained."""
    return [f"{name}.base" for name in adapted]


def adapt(model: nn.Module, lora) -> list[str]:
    """Adapts ``model`` as ``lora`` (``train.lora``: ``rank``, ``alpha``, ``targets``) says, in
    place; returns the freeze patterns of the adapted layers' bases (none without a rank)."""
    if lora is None or not lora.rank:
        return []
    return frozen_bases(add_lora(model, lora.targets, lora.rank, lora.alpha))


def merge_lora(model: nn.Module) -> int:
    """Replaces every :class:`LoRALinear` of ``model`` by its merged FP32 linear layer, in place;
    returns how many."""
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in adapted:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, getattr(owner, child).merged())
    return len(adapted)


def _some_linears(model: nn.Module, n: int = 4) -> str:
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "none"


__all__ = ["LoRALinear", "add_lora", "merge_lora"]
