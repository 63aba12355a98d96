"""``MixedPrecision``: the one object that runs a precision plan, for vlamp's trainer and anyone's loop."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from vlamp.precision.apply import apply_plan, uncalled_boundaries
from vlamp.precision.describe import PlanTable, describe_plan
from vlamp.precision.diagnostics import Diagnostics, parse_every
from vlamp.precision.errors import VlampError
from vlamp.precision.freeze import freeze as freeze_modules
from vlamp.precision.freeze import with_frozen
from vlamp.precision.fsdp import ShardGroup, shard_model
from vlamp.precision.hardware import set_tf32
from vlamp.precision.master import MasterWeights
from vlamp.precision.modes import Mode
from vlamp.precision.plan import PrecisionPlan, RuleSpec, plan_for
from vlamp.precision.probe import model_device
from vlamp.precision.scaler import (
    CollapseWatch,
    LossScaler,
    NoLossScaler,
    StepOutcome,
    across_ranks,
    choose_scaler,
    step_unscaling_inside,
    unscales_itself,
)
from vlamp.precision.update import weight_update_for
from vlamp.precision.weight_update import (
    UpdateSettings,
    WeightUpdate,
    moments_per_param,
)

ScalerSpec = LossScaler | Literal["dynamic", "static", "none"] | None


RulesSpec = Sequence[RuleSpec] | Mapping[str, str] | str | os.PathLike[str]


class MixedPrecision:
    """Mixed-precision training for any PyTorch loop.

    One training step reads::

        mp = MixedPrecision("bf16-mixed")
        model, opt = mp.setup(model, opt)
        with mp.autocast():
            loss = model(batch)
        mp.backward(loss)
        outcome = mp.step(opt, clip_grad_norm=1.0)   # unscale, check, clip, step, update, zero_grad

    Measuring is apart from running: a plan measured on this machine
    (:func:`~vlamp.precision.autoplan.measure_plan`) is handed in as the first argument.

    Args:
        mode: ``"fp32"``, ``"bf16-mixed"``, ``"fp16-mixed"``, ``"bf16-true"``, ``"fp16-true"``,
            ``"auto"`` (chosen from the hardware table; see ``vlamp doctor``), a :class:`Mode`, or
            a ready :class:`PrecisionPlan` (its mode and rules; then ``rules`` stays ``None``).
        rules: Per-module rules (see :class:`PrecisionPlan`) or a path to a YAML rules file.
        scaler: ``None`` for the mode's default (dynamic for FP16, none otherwise), a name
            (``"dynamic"``, ``"static"``, ``"none"``) or a ``LossScaler`` instance.
        builtin_rules: Whether the built-in FP32 islands (norms, embeddings, action output, loss) apply.
        num_losses: Number of losses that each get their own scaler (``backward(loss, loss_id=i)``).
        scaler_settings: Settings for a scaler given by name or chosen by the mode
            (``DynamicLossScaler``'s arguments: ``init_scale``, ``min_scale``, ``growth_interval``,
            ...; a static scaler takes ``init_scale``).
        device: For ``mode="auto"``: the device to decide for (default: CUDA when present, else
            the CPU).
        tf32: Let CUDA run FP32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa)
            — FP32 modules and FP32 islands included. Off (the default) keeps them IEEE FP32, the
            reference the other modes are measured against. Set for the process at
            :meth:`setup`; no effect on CPUs.
        diagnostics: ``"off"`` (default) or ``"every:N"``: on every N-th step (and the first),
            record per module the overflow, underflow and headroom of its activations and
            gradients and the updates its parameters lost to rounding
            (:mod:`vlamp.precision.diagnostics`); read :attr:`last_diagnostics` after each step.
        update: How weights the plan stores in low precision (the ``-true`` modes, ``params=bf16``
            rules) are updated: an :class:`UpdateSettings` (method, gradient accumulation dtype,
            rounding seed) or just the method's name (``"auto"``: the mode's own, ``"master"``,
            ``"kahan"``, ``"stochastic"``, ``"naive"``).
        freeze: Modules to freeze at :meth:`setup` (names or class names, globs as in rules): no
            gradients, no optimizer state, and in a ``-mixed`` mode their weights are stored in
            the compute dtype (:mod:`vlamp.precision.freeze`). Build the optimizer over the
            parameters that still require gradients.

    Example:
        >>> plan = measure_plan(model, batch, "auto")                      # doctest: +SKIP
        >>> mp = MixedPrecision(plan, update=UpdateSettings("kahan"))      # doctest: +SKIP
        >>> print(mp.plan.measured["reason"])                               # doctest: +SKIP

    Raises:
        VlampError: On an unknown mode, a scaler with a BF16/FP32 mode, bad rules, ``num_losses < 1``.
    """

    def __init__(
        self,
        mode: str | Mode | PrecisionPlan = "auto",
        rules: RulesSpec | None = None,
        scaler: ScalerSpec = None,
        *,
        builtin_rules: bool = True,
        num_losses: int = 1,
        scaler_settings: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        tf32: bool = False,
        diagnostics: str | int | None = None,
        update: UpdateSettings | str = UpdateSettings(),
        freeze: Sequence[str] = (),
    ) -> None:
        settings = update if isinstance(update, UpdateSettings) else UpdateSettings(update)
        self.plan = plan_for(mode, rules, builtin_rules, device)
        self.mode = self.plan.mode
        self.settings = settings.resolved(self.mode.default_update)
        self.freeze = list(freeze)
        self.frozen: list[str] = []  # the frozen modules' names, after setup
        #: What was asked for (``"auto"``, or a measured plan's request), beside :attr:`mode`.
        self.requested_mode = mode if isinstance(mode, str) else \
            ((mode.measured or {}).get("requested", mode.mode.name) if isinstance(mode, PrecisionPlan)
             else mode.name)
        if int(num_losses) != num_losses or num_losses < 1:
            raise VlampError(f"MixedPrecision: num_losses must be an integer >= 1, got {num_losses}")
        base = choose_scaler(self.mode, scaler, dict(scaler_settings or {}))
        self.scalers: list[LossScaler] = [base] + [copy.deepcopy(base) for _ in range(num_losses - 1)]
        self._found_inf = [False] * num_losses
        self.tf32 = bool(tf32)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.device = torch.device("cpu")
        self.weights = WeightUpdate(None)  # replaced at setup(model, optimizer)
        self._resolved: list[Any] = []
        self._buffers_before: list[torch.Tensor] | None = None
        self._collapse = CollapseWatch()
        self.steps = 0
        self.skipped_steps = 0
        self.uncalled: dict[str, str] = {}
        self.parallel_notes: list[str] = []  # how a data-parallel wrapper holds and reduces the model
        every = parse_every(diagnostics)
        self.diagnostics = Diagnostics(every) if every else None
        self.last_diagnostics: dict[str, Any] | None = None  # the last step's record, if sampled
        self._diag_started = False

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
              ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Applies the plan to ``model`` (in place) and chooses how ``optimizer``'s step reaches
        the weights stored in low precision (:attr:`weights`: FP32 masters, Kahan, stochastic or
        naive rounding). Create the optimizer over ``model.parameters()`` before calling this, and
        call it before the first step.

        For data-parallel or sharded training call it twice: ``mp.setup(model)`` applies the plan;
        then wrap the model in DDP, or shard it with :meth:`shard` (FSDP2); build the optimizer
        over ``model.parameters()``; then ``mp.setup(model, optimizer)``.

        Returns:
            ``(model, optimizer)``, the same objects, changed in place.
        """
        if self.model is not model or optimizer is None:
            self.device = model_device(model)
            set_tf32(self.tf32)
            self._freeze(model)
            self._resolved = self.plan.resolve(model)
            apply_plan(self._resolved)
        elif self.optimizer is not None:
            raise VlampError("MixedPrecision.setup: this model already has its optimizer; set up "
                             "each model and optimizer once")
        self.model, self.optimizer = model, optimizer
        if optimizer is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            self.weights = weight_update_for(optimizer, self.settings, names, self.mode.name)
            if self.settings.in_backward:  # where every gradient is needed first, it cannot
                scaled = not isinstance(self.scalers[0], NoLossScaler) or len(self.scalers) > 1
                if scaled or isinstance(self.weights, MasterWeights):
                    raise VlampError(f"MixedPrecision: no step in the backward in {self.mode.name} "
                                     f"with update={self.settings.method}: " + (
                                         "the loss scaler must see every gradient first" if scaled
                                         else "use update=kahan, stochastic or naive"))
                self.weights.step_in_backward(optimizer)
        if optimizer is not None and self.diagnostics is not None:
            w = self.weights
            self.diagnostics.attach(model, {id(x): w.name(i) for i, x in enumerate(w.masters)}
                                    if isinstance(w, MasterWeights) else None)
        return model, optimizer

    def _freeze(self, model: nn.Module) -> None:
        """Freezes the modules ``freeze`` names; their storage rules join the plan (once: a plan
        saved with them, as a checkpoint's is, already holds them)."""
        if not self.freeze:
            return
        self.frozen = list(freeze_modules(model, self.freeze))
        self.plan = with_frozen(self.plan, self.frozen)

    @property
    def resolved(self) -> list[Any]:
        """The plan resolved on the model given to :meth:`setup`: one entry per module."""
        return list(self._resolved)

    @property
    def low_precision_storage(self) -> list[str]:
        """Modules whose own parameters the plan stores in low precision (the ``-true`` modes, or
        a ``params=bf16`` rule): the optimizer updates FP32 masters of them."""
        return [r.name or "(root)" for r in self._resolved if r.policy.param != torch.float32
                and any(True for _ in r.module.parameters(recurse=False))]

    def shard(self, reduce_dtype: torch.dtype = torch.float32, mesh: Any = None) -> list[ShardGroup]:
        """Shards the model (set up by ``setup(model)``, no optimizer yet) with FSDP2, in groups
        whose gathered dtype follows the plan: low-precision layers travel in the compute dtype,
        FP32 islands in FP32, gradients reduced in ``reduce_dtype``
        (see :mod:`vlamp.precision.fsdp`). Call it in every rank, then build the optimizer over
        ``model.parameters()`` and call ``setup(model, optimizer)``. ``describe`` lists the groups.

        Raises:
            VlampError: Before ``setup(model)``, after the optimizer was given, or in a ``-true``
                mode (its FP32 masters would sit outside the shards).
        """
        if self.model is None or self.optimizer is not None:
            raise VlampError("MixedPrecision.shard: call setup(model) first and shard before "
                             "building the optimizer")
        if self.low_precision_storage:
            raise VlampError(f"MixedPrecision.shard: {self.low_precision_storage[0]} stores its "
                             f"weights in low precision with FP32 masters beside them ({self.mode.name}); "
                             f"shard a -mixed mode instead (FP32 shards, low-precision gathers)")
        groups = shard_model(self.model, self._resolved, mesh=mesh, reduce_dtype=reduce_dtype)
        self.parallel_notes = [f"FSDP2 shard groups ({len(groups)}):"] + [f"  {g.line()}" for g in groups]
        return groups

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"``: where the model is now (autocast follows it)."""
        return self._follow_model().type

    def _follow_model(self) -> torch.device:
        """The model's device now. When the model moved since :meth:`setup` (``model.cuda()``),
        the FP32 masters move with it, as long as the optimizer has no state yet to move."""
        if self.model is None:
            return self.device
        now = model_device(self.model)
        if now != self.device:
            if self.optimizer is not None and self.optimizer.state:
                raise VlampError(
                    f"MixedPrecision: the model moved from {self.device} to {now} after its "
                    f"optimizer had stepped; the optimizer's state (and FP32 masters) stay on "
                    f"{self.device}. Move the model first, then build the optimizer and call "
                    f"mp.setup(model, optimizer)")
            if self.optimizer is not None and self.weights.lost_parameters(self.model, self.optimizer):
                raise VlampError(
                    f"MixedPrecision: moving the model from {self.device} to {now} replaced its "
                    f"parameters (as moves from or to the meta device do), so the optimizer "
                    f"updates tensors the model no longer has. Move the model first, then build "
                    f"the optimizer and call mp.setup(model, optimizer)")
            self.weights.to(now)
            self.device = now
        return now

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The context for forward passes (and the loss): the mode's autocast on the model's device.

        The first forward of a step also notes the model's buffers (running statistics), so a
        step that is then skipped for inf/NaN gradients leaves them as they were."""
        if self._buffers_before is None and self.model is not None and self.model.training:
            self._buffers_before = [b.detach().clone() for b in self.model.buffers()]
        if self.diagnostics is not None and not self._diag_started and self.model is not None \
                and self.model.training:
            self.diagnostics.begin(self.steps + 1)
            self._diag_started = True
        with self.mode.autocast(self.device_type):
            yield

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """The context around all micro-batches of one step (forward *and* backward passes).

        Autocast keeps the low-precision copy of each FP32 weight it casts until the outermost
        autocast context closes; each micro-batch's :meth:`autocast` would close it and cast every
        weight again. Inside this context (an outer, disabled autocast: it changes no op) the
        copies live until the step's last backward, so each weight is cast once per step. The
        weights do not change between micro-batches, so the gradients are the same bits.
        """
        with torch.autocast(self.device_type, enabled=False):
            yield

    # -- backward and step -----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, loss_id: int = 0, **kwargs: Any) -> None:
        """Backpropagates ``loss`` times its scaler's scale. Call once per micro-batch; gradients add
        up until :meth:`step`. ``kwargs`` go to ``Tensor.backward``."""
        scaler = self.scalers[loss_id]
        self.weights.before_backward()
        if len(self.scalers) == 1:
            scaler.scale_loss(loss).backward(**kwargs)
            self.weights.after_backward()
            return
        # Several scales: this backward's gradients are unscaled on their own before joining the
        # earlier ones, so each scale is checked and updated by its own overflows.
        params = self._params()
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        scaler.scale_loss(loss).backward(**kwargs)
        self.weights.after_backward()
        fresh = [p.grad for p in params if p.grad is not None]
        self._found_inf[loss_id] |= scaler.unscale_(fresh) if fresh else False
        with torch.no_grad():
            for p, old in zip(params, stash):
                if old is not None:
                    p.grad = old if p.grad is None else p.grad.add_(old)

    def step(self, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None) -> StepOutcome:
        """Unscale -> non-finite check -> clip -> optimizer step (or skip) -> scaler update -> zero_grad.

        Args:
            optimizer: The optimizer given to :meth:`setup`.
            clip_grad_norm: Clip the total norm of the *unscaled* gradients to this value.

        Returns:
            A :class:`StepOutcome`; ``skipped`` is true when any gradient was inf/NaN.
        """
        if self.steps == 0:
            self._check_boundaries_ran()
        grads = self.weights.grads(optimizer)
        scale = self.scalers[0].scale
        if self.diagnostics is not None:
            self.diagnostics.before_update(optimizer)
        found_per_loss, stepped = self._unscale(optimizer, grads, scale, clip_grad_norm)
        grad_norm, clip_inf = self._clip(optimizer, grads, clip_grad_norm, found_per_loss, scale)
        found = any(found_per_loss) or clip_inf
        if not found:
            if not isinstance(self.scalers[0], NoLossScaler):
                self._collapse.observe(grads, grad_norm, scale, self.steps + 1)
            self.weights.step(optimizer, stepped=stepped)
        else:
            self._restore_buffers()
        self._buffers_before = None
        if self.diagnostics is not None:
            self.diagnostics.after_update(optimizer, applied=not found)
            self.last_diagnostics = self.diagnostics.end(scale)
            self._diag_started = False
        for i, scaler in enumerate(self.scalers):
            scaler.update(found_per_loss[i] or clip_inf)
        self._found_inf = [False] * len(self.scalers)
        self._zero_grad(optimizer)
        self.steps += 1
        self.skipped_steps += int(found)
        return StepOutcome(skipped=found, scale=scale, grad_norm=grad_norm, found_inf=found)

    def _unscale(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], scale: float,
                 clip_grad_norm: float | None) -> tuple[list[bool], bool]:
        """Unscales the gradients and checks them: per loss, whether any was inf/NaN, and whether
        the optimizer already stepped.

        A fused optimizer unscales and skips inside its own kernel: no pass that rewrites every
        gradient, and the inf/NaN flag is read back only once the step is queued. Clipping needs
        the unscaled gradients first, so it takes the plain path."""
        if len(self.scalers) > 1:
            return list(self._found_inf), False  # each loss unscaled its own in backward()
        if (scale != 1.0 and clip_grad_norm is None and bool(grads) and self.weights.fused_handoff
                and unscales_itself(optimizer)):
            return [step_unscaling_inside(optimizer, grads, scale)], True
        if scale != 1.0 or clip_grad_norm is None:
            return [self.scalers[0].unscale_(grads)], False
        return [False], False  # the clipping norm is the non-finite check

    def _clip(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
              clip_grad_norm: float | None, found_per_loss: list[bool], scale: float
              ) -> tuple[float | None, bool]:
        """Clips to ``clip_grad_norm``: the norm before clipping and whether it was not finite
        (the one verdict of every rank when the norm was the only check)."""
        if clip_grad_norm is None:
            return None, False
        norm = self.weights.clip(optimizer, grads, clip_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        clip_inf = not math.isfinite(grad_norm)
        if found_per_loss == [False] and scale == 1.0:
            clip_inf = bool(across_ranks(torch.tensor(float(clip_inf), device=self.device)).item())
        return grad_norm, clip_inf

    def _restore_buffers(self) -> None:
        """A skipped step's forward moved running statistics: put them back."""
        if self._buffers_before is not None and self.model is not None:
            with torch.no_grad():
                for b, old in zip(self.model.buffers(), self._buffers_before):
                    b.copy_(old)

    def _zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.weights.zero_grad()
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)

    def _check_boundaries_ran(self) -> None:
        """After the first step's forward: rules on modules whose forward never ran (their parent
        uses their weights directly, as ``MultiheadAttention`` does with ``out_proj``) changed
        their storage only. Says so, and ``describe`` marks them."""
        self.uncalled = uncalled_boundaries(self._resolved) or {}  # None: compiled, nothing counted
        if self.uncalled:
            names = ", ".join(f"{n} ({rule})" for n, rule in list(self.uncalled.items())[:4])
            warnings.warn(f"MixedPrecision: {len(self.uncalled)} ruled module(s) never ran their own "
                          f"forward: {names}. Their parents use their weights directly, so the rule "
                          f"changed only how their weights are stored; their compute follows the "
                          f"parent. Rule the parent instead", UserWarning, stacklevel=3)

    @property
    def zero_grad_steps(self) -> int:
        """Applied steps whose (scaled) gradients were all zero: a collapsed loss scale."""
        return self._collapse.zero_grad_steps

    def master_weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict with each low-precision parameter replaced by the weight the
        optimizer really updates (its FP32 master, or Kahan's ``w + c``): what an EMA should
        average."""
        if self.model is None:
            raise VlampError("MixedPrecision: call setup(model, optimizer) first")
        return {**self.model.state_dict(), **self.weights.exact_weights()}

    def sync_masters(self, weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Sets what the update holds beside the model (FP32 masters, Kahan compensation) from
        ``weights`` (e.g. a checkpoint's full-precision weights, by parameter name) or from the
        model's current weights. Call it after loading weights into the model by hand: otherwise
        the next step writes the masters' older values back."""
        self.weights.sync_from(dict(weights) if weights is not None else None)

    def _params(self) -> list[torch.Tensor]:
        if self.model is None:
            raise VlampError("MixedPrecision: call setup(model, optimizer) first")
        return self.weights.trainable(self.model)

    # -- state -----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The current loss scale of the first loss."""
        return self.scalers[0].scale

    def state_dict(self) -> dict[str, Any]:
        """Mode, step counters, every scaler's state and the plan (plain data), and the update's
        tensors: FP32 masters by name (``master_weights``) or Kahan buffers and the rounding
        generator (``update_tensors``)."""
        state = {
            "mode": self.mode.name, "steps": self.steps, "skipped_steps": self.skipped_steps,
            "scalers": [{"type": type(s).__name__, **s.state_dict()} for s in self.scalers],
            "plan": self.plan.to_dict(),
            "tf32": self.tf32,
            "master_weights": self.weights.masters_state(),
            "update_tensors": self.weights.state_dict(),
            "update": self.settings.method, "grad_accum": self.settings.grad_accum,
            "optimizer_state": self.settings.optimizer_state,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`. A different mode is allowed (the caller reports it); scaler
        state is then only restored when the scaler types match, and FP32 masters that were not
        saved (or not for these parameters) are taken from the model's current weights, so load
        the weights into the model first."""
        self.steps = int(state.get("steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        saved = state.get("scalers", [])
        for scaler, s in zip(self.scalers, saved):
            if s.get("type") == type(scaler).__name__:
                scaler.load_state_dict({k: v for k, v in s.items() if k != "type"})
        self.weights.load_masters(state.get("master_weights") or {})
        self.weights.load_state_dict(state.get("update_tensors") or {})

    def describe(self, max_depth: int | None = None) -> PlanTable:
        """The describe table of the model given to :meth:`setup`; after the first step, rules on
        modules that never ran their own forward are marked as changing storage only."""
        if self.model is None:
            raise VlampError("MixedPrecision.describe: call setup(model, optimizer) first")
        table = describe_plan(self.plan, self.model, max_depth=max_depth, uncalled=self.uncalled,
                              update=self.settings.method,
                              moments=max(moments_per_param(self.optimizer),  # 8-bit: held here
                                          max(map(len, self.weights.packed.values()), default=0)),
                              state8=self.settings.optimizer_state == "8bit")
        if self.low_precision_storage or self.settings.optimizer_state != "auto":
            table.notes.append(self.settings.describe())
        device = self.device_type
        fp32 = ("TF32 tensor cores (tf32=True)" if self.tf32 else "IEEE FP32 (tf32=False)") \
            if device == "cuda" else "IEEE FP32"
        table.notes.append(f"device {self.device}; FP32 matmuls and convolutions run in {fp32}")
        table.notes.extend(self.parallel_notes)
        return table

    def __repr__(self) -> str:
        return f"MixedPrecision(mode={self.mode.name!r}, scaler={type(self.scalers[0]).__name__})"


