"""Loss scalers: keep small FP16 gradients above the underflow threshold, skip non-finite steps.

A scaler multiplies the loss by ``scale`` before backward, divides the gradients by it afterwards in
one fused pass that also checks them for inf/NaN (``torch._amp_foreach_non_finite_check_and_unscale_``,
grouped per device and dtype, as ``torch.amp.GradScaler`` does), and then ``update(found_inf)``
moves its schedule. The optimizer step is skipped by the caller when ``found_inf`` is true.

Across ranks (``torch.distributed`` initialized, more than one rank) the inf/NaN flag is summed over
every rank before anyone reads it, so all ranks skip the same steps and their scalers stay one state
(as ``ShardedGradScaler`` does): a rank whose gradient shard overflowed would otherwise step alone.
Sharded gradients (FSDP2's DTensors) are checked and unscaled shard by shard, in place.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from vlamp.precision.errors import VlampError


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did.

    Attributes:
        skipped: True if the optimizer step was not taken (non-finite gradients). An LR schedule
            and an EMA should not advance on a skipped step.
        scale: The loss scale this step's gradients were computed with (1.0 without scaling).
        grad_norm: Total norm of the unscaled gradients before clipping, or ``None`` if no
            clipping was asked for.
        found_inf: True if any gradient was inf or NaN.
    """

    skipped: bool
    scale: float
    grad_norm: float | None
    found_inf: bool


def _check_and_unscale(grads: Iterable[torch.Tensor], inv_scale: float,
                       device: torch.device | None = None) -> torch.Tensor:
    """Multiplies ``grads`` in place by ``inv_scale`` (a pure check when it is 1): one fused
    kernel per (device, dtype) group. Returns a 0-dim FP32 flag on ``device`` (default: the first
    gradient's), > 0 where any gradient was inf/NaN; nothing is read back to the host."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        g = _local(g)
        groups[(g.device, g.dtype)].append(g)
    if device is None:
        device = next(iter(groups))[0] if groups else torch.device("cpu")
    flag = torch.zeros((), device=device)
    for (dev, _), tensors in groups.items():
        part = torch.zeros(1, device=dev)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, part, inv)
        flag = flag.add(part.to(device, non_blocking=True).reshape(()))
    return across_ranks(flag)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's own shard (an FSDP2 DTensor's local tensor), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def across_ranks(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` summed over all ranks, in place, when ``torch.distributed`` runs with more than one
    rank (one small all-reduce); else ``flag`` itself."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag


def found_inf_flag(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-dim FP32 tensor on ``device``, 1 where any of ``grads`` is inf/NaN, else 0, computed
    without unscaling them and without reading it back: for optimizers that unscale and skip
    inside their own kernel (``found_inf``/``grad_scale``, as ``torch.amp.GradScaler`` hands them
    to fused optimizers)."""
    return _check_and_unscale(grads, 1.0, device).clamp_(max=1.0)


def unscale_and_check(grads: Iterable[torch.Tensor], inv_scale: float) -> bool:
    """Multiplies ``grads`` in place by ``inv_scale`` and reports whether any was non-finite
    (one read of the device, whatever the number of groups)."""
    return bool(_check_and_unscale(grads, inv_scale).item())


def unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes ``grad_scale``/``found_inf`` and unscales and skips inside its
    own kernel: torch's fused Adam/AdamW/SGD (``fused=True``) on CPU and CUDA."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def step_unscaling_inside(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
                           scale: float) -> bool:
    """Steps a fused optimizer on gradients still multiplied by ``scale``: it divides them in its
    kernel and changes nothing (state included) where the flag says inf/NaN. Returns the flag."""
    device = grads[0].device
    found = found_inf_flag(grads, device)
    optimizer.grad_scale = torch.tensor(scale, dtype=torch.float32, device=device)
    optimizer.found_inf = found
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = optimizer.found_inf = None
    return bool(found.item())


class LossScaler(abc.ABC):
    """Interface of every loss scaler. Subclasses override the schedule, not the mechanics."""

    @property
    @abc.abstractmethod
    def scale(self) -> float:
        """The current loss scale."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Returns ``loss * scale`` (the loss itself when the scale is 1)."""
        s = self.scale
        return loss if s == 1.0 else loss * s

    def unscale_(self, grads: Iterable[torch.Tensor]) -> bool:
        """Divides the gradients by the scale in place; returns True if any was inf/NaN."""
        return unscale_and_check(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Advances the schedule after a step; ``found_inf`` says whether it was skipped."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class NoLossScaler(LossScaler):
    """Scale 1: the gradients are only checked for inf/NaN so such steps are still skipped."""

    @property
    def scale(self) -> float:
        return 1.0


class StaticLossScaler(LossScaler):
    """A fixed loss scale.

    Args:
        scale: The factor the loss is multiplied by; must be positive and finite.

    Raises:
        VlampError: If ``scale`` is not a positive finite number.
    """

    def __init__(self, scale: float = 2.0**16) -> None:
        _check_positive("StaticLossScaler", "scale", scale)
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale = float(state["scale"])


class DynamicLossScaler(LossScaler):
    """A loss scale that grows while gradients are finite and backs off when they overflow.

    The state machine, run by ``update(found_inf)`` after every step::

        if found_inf:                           # the step was skipped
            skipped_steps += 1
            growth_tracker = 0
            if hysteresis_left > 1:             # tolerate this overflow, keep the scale
                hysteresis_left -= 1
            elif scale * backoff_factor < min_scale:   # at the floor: never abort
                scale = min_scale; skips_at_min_scale += 1
                warn when the floor is reached (again after any finite step)
            else:
                scale = scale * backoff_factor
        else:
            growth_tracker += 1
            if growth_tracker == growth_interval:
                scale = min(scale * growth_factor, max_scale)
                growth_tracker = 0
                hysteresis_left = hysteresis    # forgiveness is restored on growth

    With the defaults (``min_scale=None``, ``max_scale=None``, ``hysteresis=1``) the sequence of scales
    and skips is exactly ``torch.amp.GradScaler``'s; ``hysteresis`` has DeepSpeed's meaning (how many
    overflows are tolerated before the scale is lowered), but unlike DeepSpeed the scaler never raises
    at the minimum: it keeps skipping, counts and warns.

    Args:
        init_scale: The first scale (PyTorch: 2**16).
        growth_factor: Factor applied after ``growth_interval`` finite steps in a row (> 1).
        backoff_factor: Factor applied on overflow (0 < f < 1).
        growth_interval: Finite steps in a row before growing (>= 1).
        min_scale: Floor of the scale, or ``None`` for none.
        max_scale: Ceiling of the scale, or ``None`` for none.
        hysteresis: Overflows tolerated before backing off (>= 1; 1 backs off on every overflow).

    Raises:
        VlampError: On a non-positive scale or bound, factors on the wrong side of 1, an interval or
            hysteresis below 1, or ``min_scale > max_scale``.

    Example:
        >>> s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
        >>> s.update(found_inf=True); s.scale
        4.0
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float | None = None,
        max_scale: float | None = None,
        hysteresis: int = 1,
    ) -> None:
        name = "DynamicLossScaler"
        _check_positive(name, "init_scale", init_scale)
        if not growth_factor > 1.0:
            raise VlampError(f"{name}: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise VlampError(f"{name}: backoff_factor must be in (0, 1), got {backoff_factor}")
        if int(growth_interval) != growth_interval or growth_interval < 1:
            raise VlampError(f"{name}: growth_interval must be an integer >= 1, got {growth_interval}")
        if int(hysteresis) != hysteresis or hysteresis < 1:
            raise VlampError(f"{name}: hysteresis must be an integer >= 1, got {hysteresis}")
        if min_scale is not None:
            _check_positive(name, "min_scale", min_scale)
        if max_scale is not None:
            _check_positive(name, "max_scale", max_scale)
        if min_scale is not None and max_scale is not None and min_scale > max_scale:
            raise VlampError(f"{name}: min_scale {min_scale} > max_scale {max_scale}")
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = None if min_scale is None else float(min_scale)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.hysteresis = int(hysteresis)
        self._scale = self._clamp(self.init_scale)
        self.growth_tracker = 0
        self.hysteresis_left = self.hysteresis
        self.skipped_steps = 0
        self.skips_at_min_scale = 0
        self._at_floor = False

    @property
    def scale(self) -> float:
        return self._scale

    def _clamp(self, value: float) -> float:
        if self.min_scale is not None:
            value = max(value, self.min_scale)
        if self.max_scale is not None:
            value = min(value, self.max_scale)
        return value

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.skipped_steps += 1
            self.growth_tracker = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
                return
            lowered = self._scale * self.backoff_factor
            if self.min_scale is not None and lowered < self.min_scale:
                if self._scale <= self.min_scale:
                    self.skips_at_min_scale += 1
                    if not self._at_floor:  # each time the floor is reached, not once a lifetime
                        self._at_floor = True
                        warnings.warn(
                            f"DynamicLossScaler: gradients overflow at min_scale={self.min_scale}; "
                            "steps keep being skipped (see skips_at_min_scale)",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                lowered = self.min_scale
            self._scale = lowered
        else:
            self._at_floor = False
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self._scale = self._clamp(self._scale * self.growth_factor)
                self.growth_tracker = 0
                self.hysteresis_left = self.hysteresis

    _FIELDS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "min_scale",
               "max_scale", "hysteresis", "growth_tracker", "hysteresis_left", "skipped_steps",
               "skips_at_min_scale")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scale": self._scale}
        state.update({f: getattr(self, f) for f in self._FIELDS})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [f for f in ("scale", *self._FIELDS) if f not in state]
        if missing:
            raise VlampError(f"DynamicLossScaler.load_state_dict: missing fields {missing}")
        self._scale = float(state["scale"])
        for f in self._FIELDS:
            setattr(self, f, state[f])


def _check_positive(cls: str, arg: str, value: float) -> None:
    try:
        ok = float(value) > 0 and float(value) != float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise VlampError(f"{cls}: {arg} must be a positive finite number, got {value!r}")


SCALER_NAMES = ("dynamic", "static", "none")


def make_scaler(name: str, **settings: Any) -> LossScaler:
    """Builds a scaler from its name (dynamic, static or none) and ``DynamicLossScaler``'s settings
    (``init_scale``, ``growth_factor``, ``backoff_factor``, ``growth_interval``, ``min_scale``,
    ``max_scale``, ``hysteresis``); a static scaler takes ``init_scale`` only, none takes none."""
    key = str(name).strip().lower()
    if key not in SCALER_NAMES:
        raise VlampError(f"scaler: unknown scaler {name!r}; legal: {', '.join(SCALER_NAMES)}")
    if key == "dynamic":
        return DynamicLossScaler(**settings)
    if key == "static":
        return StaticLossScaler(settings.get("init_scale", 2.0**16))
    return NoLossScaler()


def choose_scaler(mode: Any, scaler: LossScaler | str | None, settings: dict[str, Any]) -> LossScaler:
    """The scaler ``MixedPrecision`` runs: ``scaler`` (a name or an instance), or the mode's default
    (``mode.default_scaler()``) built with ``settings`` when any are given.

    Raises:
        VlampError: On an unknown scaler, or a scaler for a mode with FP32 gradient range.
    """
    if scaler is None:
        default = mode.default_scaler()
        if not settings:
            return default
        scaler = "dynamic" if isinstance(default, DynamicLossScaler) else \
            "static" if isinstance(default, StaticLossScaler) else "none"
    chosen = make_scaler(scaler, **settings) if isinstance(scaler, str) else scaler
    if not isinstance(chosen, LossScaler):
        raise VlampError(f"MixedPrecision: scaler must be dynamic, static, none or a LossScaler, "
                         f"got {scaler!r}")
    if not isinstance(chosen, NoLossScaler) and not mode.needs_scaler:
        raise VlampError(f"MixedPrecision: mode {mode.name!r} needs no loss scaler "
                         f"(its gradients have FP32 range); use scaler=None or 'none'")
    if isinstance(chosen, NoLossScaler) and mode.needs_scaler:
        warnings.warn(f"MixedPrecision: mode {mode.name!r} without loss scaling: small FP16 "
                      "gradients will underflow to zero", UserWarning, stacklevel=4)
    return chosen


class CollapseWatch:
    """Says so, each time it starts, when a scaled step is applied with all-zero gradients: the
    scale has collapsed after overflows (or the loss does not depend on the weights).

    Attributes:
        zero_grad_steps: Applied steps whose gradients were all zero, so far.
    """

    def __init__(self) -> None:
        self.zero_grad_steps = 0
        self._streak = 0

    def observe(self, grads: list[torch.Tensor], grad_norm: float | None, scale: float, step: int) -> None:
        norm = grad_norm if grad_norm is not None else (
            float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0)
        if norm != 0.0:
            self._streak = 0
            return
        self.zero_grad_steps += 1
        self._streak += 1
        if self._streak == 1:
            warnings.warn(f"MixedPrecision: step {step} was applied with all-zero gradients "
                          f"at loss scale {scale:.3g}: the scale has collapsed after overflows, or "
                          f"the loss does not depend on the weights. Give the dynamic scaler a floor "
                          f"(precision.loss_scale.min_scale, e.g. 1) or look for the overflow",
                          RuntimeWarning, stacklevel=4)
