"""One training step, the learning-rate schedule, the weight average and the measured plan: the
parts the trainer, the benchmark and fit's probes share."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlamp.precision.autoplan import measure_plan
from vlamp.precision.hardware import set_tf32
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.plan import PrecisionPlan
from vlamp.precision.scaler import StepOutcome
from vlamp.train.config import PrecisionConfig
from vlamp.train.distributed import gradient_sync, mean_over_ranks

Batch = dict[str, torch.Tensor]


def measured_plan(model: nn.Module, batch: Batch, mode: str, precision: PrecisionConfig,
                  log: Callable[[str], None] | None = None, freeze: Sequence[str] = (),
                  cached_only: bool = False) -> PrecisionPlan | None:
    """``mode``'s plan as a run with these precision settings (``RunConfig.precision``) measures
    it on this machine (:func:`vlamp.precision.autoplan.measure_plan`): its rules first, then the
    speed half, sensitivity and lean islands as the settings ask, with the modules the run freezes
    (``freeze``: ``train.freeze`` and the LoRA bases) frozen. For a model not yet set up.
    ``cached_only``: ``None`` where the plan would be measured, not read from the cache."""
    p = precision
    set_tf32(p.tf32)  # measured as it will run
    return measure_plan(model, batch, mode, rules=p.rules or None, log=log,
                        sensitivity=p.sensitivity or None, lean=p.lean_islands or None,
                        freeze=freeze, cached_only=cached_only)


@dataclass(frozen=True)
class StepResult:
    """The mean loss over the step's micro-batches and what the precision object did."""

    loss: float
    outcome: StepOutcome


def train_step(model: nn.Module, micro_batches: Sequence[Batch], mp: MixedPrecision,
               optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None,
               loss_weights: Sequence[float] | None = None) -> StepResult:
    """autocast -> scaled backward (per micro-batch) -> unscale -> clip -> step -> scaler update ->
    zero_grad. ``model(batch)`` must return the loss. Skipped (inf/NaN) steps change no weight.

    Args:
        model: A model set up by ``mp.setup`` (or its DDP wrapper).
        micro_batches: One batch, or several whose gradients are accumulated into one step.
        mp: The precision object.
        optimizer: The optimizer given to ``mp.setup``.
        clip_grad_norm: Clip the unscaled gradient norm to this (``None``: no clipping).
        loss_weights: A factor per micro-batch loss (default 1): this rank's share of a mean
            over all ranks (see :func:`vlamp.train.distributed.loss_shares`).
    """
    losses = []
    last = len(micro_batches) - 1
    with mp.accumulate():  # each weight cast to low precision once per step, not per micro-batch
        for i, batch in enumerate(micro_batches):
            # Under DDP/FSDP2 gradients are reduced across ranks once, after the last micro-batch.
            with gradient_sync(model, i == last):
                with mp.autocast():
                    loss = model(batch)
                    if loss_weights is not None:
                        loss = loss * loss_weights[i]
                mp.backward(loss / len(micro_batches))
            losses.append(loss.detach().float())
    outcome = mp.step(optimizer, clip_grad_norm=clip_grad_norm)
    # One read of the device (after the step is queued), not one per micro-batch; the loss of
    # the whole (all ranks') batch.
    return StepResult(loss=float(mean_over_ranks(torch.stack(losses).mean())), outcome=outcome)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A batch's tensors on ``device``. To a GPU they go through pinned (page-locked) memory and
    are copied without blocking, so the copy overlaps the work already queued."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` of a model already set up by ``MixedPrecision`` (its precision boundaries
    are forward hooks, which the compiler traces). The returned module shares the weights."""
    return torch.compile(model, backend=backend)


def learning_rate(applied_steps: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak * min_ratio``
    at ``total``. Driven by the count of *applied* steps, so a skipped step does not advance it."""
    if applied_steps < warmup:
        return peak * (applied_steps + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (applied_steps - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """An FP32 exponential moving average of a model's floating-point parameters and buffers.

    Args:
        model: The model whose weights are averaged.
        decay: Weight of the old average, e.g. 0.999.
        source: Where the weights are read on every :meth:`update` (default
            ``model.state_dict``). Pass ``mp.master_weights`` so that in the ``-true`` modes the
            FP32 masters are averaged, not their rounded low-precision copies: an update too small
            to move a bf16 weight still moves the average.
    """

    def __init__(self, model: nn.Module, decay: float,
                 source: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        self.decay = decay
        self.model = model
        self.source = source or model.state_dict
        sd = self.source()
        self.names = [n for n, t in sd.items() if t.is_floating_point()]
        self.shadow = [sd[n].detach().float().clone() for n in self.names]

    @torch.no_grad()
    def update(self) -> None:
        sd = self.source()
        torch._foreach_lerp_(self.shadow, [sd[n].float() for n in self.names], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": t for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(tensors[f"ema.{n}"])

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights, as a model state dict (cast back to each tensor's dtype)."""
        sd = self.model.state_dict()
        out = {n: t for n, t in sd.items()}
        out.update({n: s.to(sd[n].dtype) for n, s in zip(self.names, self.shadow)})
        return out


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients; biases, norms and embeddings tables (1-D
    and position tables) are not decayed. Fused: one pass over all parameters (faster than the
    multi-tensor ``foreach`` kernel; docs/measurements.md)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen: none
    decay = [p for n, p in trainable if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "pos_embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)
