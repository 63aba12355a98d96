"""``MixedPrecision``: the one object that decides precision, for vlamp's trainer and anyone's loop."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from vlamp.precision.apply import apply_plan, uncalled_boundaries
from vlamp.precision.autoplan import model_device, plan_for
from vlamp.precision.diagnostics import Diagnostics, parse_every
from vlamp.precision.errors import VlampError
from vlamp.precision.fsdp import ShardGroup, shard_model
from vlamp.precision.hardware import set_tf32
from vlamp.precision.master import MasterWeights, updates_lost_parameters
from vlamp.precision.modes import Mode
from vlamp.precision.plan import PrecisionPlan, RuleSpec
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
from vlamp.precision.update import (
    LowPrecisionUpdate,
    check_update,
    clip_grads,
    low_precision_updates,
    moments_per_param,
    update_note,
)

ScalerSpec = LossScaler | Literal["dynamic", "static", "none"] | None


class MixedPrecision:
    """Mixed-precision training for any PyTorch loop.

    One training step reads::

        mp = MixedPrecision("bf16-mixed")
        model, opt = mp.setup(model, opt)
        with mp.autocast():
            loss = model(batch)
        mp.backward(loss)
        outcome = mp.step(opt, clip_grad_norm=1.0)   # unscale, check, clip, step, update, zero_grad

    Args:
        mode: ``"fp32"``, ``"bf16-mixed"``, ``"fp16-mixed"``, ``"bf16-true"``, ``"fp16-true"`` or
            ``"auto"`` (chosen from the hardware; see ``vlamp doctor``).
        rules: Per-module rules (see :class:`PrecisionPlan`), a path to a YAML rules file, or a
            ready ``PrecisionPlan``.
        scaler: ``None`` for the mode's default (dynamic for FP16, none otherwise), a name
            (``"dynamic"``, ``"static"``, ``"none"``) or a ``LossScaler`` instance.
        builtin_rules: Whether the built-in FP32 islands (norms, embeddings, action output, loss) apply.
        num_losses: Number of losses that each get their own scaler (``backward(loss, loss_id=i)``).
        model: With ``example_batch``: measure the plan on this model (not changed; copies are
            timed) and keep FP32 where low precision is slower here; with ``mode="auto"`` the
            measured step also decides between the low-precision mode and FP32. See
            :func:`vlamp.precision.autoplan.measure_plan`; the result is cached.
        example_batch: A real batch; ``loss_fn(model, batch)`` (default ``model(batch)``) is the loss.
        loss_fn: How the loss is computed from the model and a batch, for the measurement.
        cache: Read and write the measured-plan cache.
        log: Called with a line on what the measurement did (e.g. ``print``).
        scaler_settings: Settings for a scaler given by name or chosen by the mode
            (``DynamicLossScaler``'s arguments: ``init_scale``, ``min_scale``, ``growth_interval``,
            ...; a static scaler takes ``init_scale``).
        device: For ``mode="auto"`` without ``model``: the device to decide for (default: CUDA
            when present, else the CPU). With ``model``, its own device decides.
        tf32: Let CUDA run FP32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa)
            — FP32 modules and FP32 islands included. Off (the default) keeps them IEEE FP32, the
            reference the other modes are measured against. Set for the process at
            :meth:`setup`; no effect on CPUs.
        diagnostics: ``"off"`` (default) or ``"every:N"``: on every N-th step (and the first),
            record per module the overflow, underflow and headroom of its activations and
            gradients and the updates its parameters lost to rounding
            (:mod:`vlamp.precision.diagnostics`); read :attr:`last_diagnostics` after each step.
        sensitivity: With ``model``/``example_batch``: also measure each module's error in low
            precision against FP32 and keep in FP32 those above this relative error, in place
            of the built-in islands (see :func:`vlamp.precision.autoplan.measure_plan`).
        update: How weights the plan stores in low precision (the ``-true`` modes, ``params=bf16``
            rules) are updated: ``"master"`` (FP32 master copies, the default), ``"kahan"``
            (a compensation buffer in the weight's dtype), ``"stochastic"`` (stochastic rounding
            into BF16) or ``"naive"`` (round to nearest); without masters the optimizer's
            moments are kept in the weight's dtype. See :mod:`vlamp.precision.update`.
        grad_accum: The dtype gradients of several micro-batches are summed in, for weights stored
            in low precision: ``"fp32"`` (default) or ``"storage"`` (the weight's dtype).
        rounding_seed: Seed of the stochastic-rounding generator (saved in :meth:`state_dict`).

    Example:
        >>> mp = MixedPrecision("auto", model=model, example_batch=batch)  # doctest: +SKIP
        >>> print(mp.plan.measured["reason"])                               # doctest: +SKIP

    Raises:
        VlampError: On an unknown mode, a scaler with a BF16/FP32 mode, bad rules, ``num_losses < 1``.
    """

    def __init__(
        self,
        mode: str | Mode = "auto",
        rules: Sequence[RuleSpec] | Mapping[str, str] | str | os.PathLike[str] | PrecisionPlan | None = None,
        scaler: ScalerSpec = None,
        *,
        builtin_rules: bool = True,
        num_losses: int = 1,
        model: nn.Module | None = None,
        example_batch: Any = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        cache: bool = True,
        log: Callable[[str], None] | None = None,
        scaler_settings: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        tf32: bool = False,
        diagnostics: str | int | None = None,
        sensitivity: float | None = None,
        update: str = "master",
        grad_accum: str = "fp32",
        rounding_seed: int = 0,
    ) -> None:
        check_update(update, grad_accum)
        self.requested_mode = mode if isinstance(mode, str) else mode.name
        if model is not None:
            set_tf32(tf32)  # measured as it will run
        self.plan = plan_for(mode, rules, builtin_rules, model=model, example_batch=example_batch,
                             loss_fn=loss_fn, cache=cache, log=log, device=device,
                             sensitivity=sensitivity)
        self.mode = self.plan.mode
        if int(num_losses) != num_losses or num_losses < 1:
            raise VlampError(f"MixedPrecision: num_losses must be an integer >= 1, got {num_losses}")
        base = choose_scaler(self.mode, scaler, dict(scaler_settings or {}))
        self.scalers: list[LossScaler] = [base] + [copy.deepcopy(base) for _ in range(num_losses - 1)]
        self._found_inf = [False] * num_losses
        self.tf32 = bool(tf32)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.device = torch.device("cpu")
        self._masters: MasterWeights | None = None
        self.update, self.grad_accum, self.rounding_seed = update, grad_accum, int(rounding_seed)
        self._update: LowPrecisionUpdate | None = None
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
        """Applies the plan to ``model`` (in place) and, for parameters stored in low precision,
        gives ``optimizer`` FP32 master weights. Create the optimizer over ``model.parameters()``
        before calling this, and call it before the first step.

        For data-parallel or sharded training call it twice: ``mp.setup(model)`` applies the plan;
        then wrap the model in DDP, or shard it with :meth:`shard` (FSDP2); build the optimizer
        over ``model.parameters()``; then ``mp.setup(model, optimizer)``.

        Returns:
            ``(model, optimizer)``, the same objects, changed in place.
        """
        if self.model is not model or optimizer is None:
            self.device = model_device(model)
            set_tf32(self.tf32)
            self._resolved = self.plan.resolve(model)
            apply_plan(self._resolved)
        elif self.optimizer is not None:
            raise VlampError("MixedPrecision.setup: this model already has its optimizer; set up "
                             "each model and optimizer once")
        self.model, self.optimizer = model, optimizer
        if optimizer is not None and self.mode.master_weights:
            names = {id(p): n for n, p in model.named_parameters()}
            updates = low_precision_updates(optimizer, self.update, names, self.grad_accum,
                                            self.rounding_seed, self.mode.name)
            self._masters = updates if isinstance(updates, MasterWeights) else None
            self._update = updates if isinstance(updates, LowPrecisionUpdate) else None
        if optimizer is not None and self.diagnostics is not None:
            m = self._masters
            self.diagnostics.attach(model, {id(x): m.name(i) for i, x in enumerate(m.masters)}
                                    if m is not None else None)
        return model, optimizer

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
            if self.optimizer is not None and updates_lost_parameters(self.model, self.optimizer,
                                                                      self._masters):
                raise VlampError(
                    f"MixedPrecision: moving the model from {self.device} to {now} replaced its "
                    f"parameters (as moves from or to the meta device do), so the optimizer "
                    f"updates tensors the model no longer has. Move the model first, then build "
                    f"the optimizer and call mp.setup(model, optimizer)")
            if self._masters is not None:
                self._masters.to(now)
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
        if self._update is not None:
            self._update.fold_grads()  # FP32 sums of the earlier micro-batches, if any
        accumulate = self._masters is not None and self.grad_accum == "fp32"
        if len(self.scalers) == 1:
            scaler.scale_loss(loss).backward(**kwargs)
            if accumulate:
                self._masters.accumulate_grads()
            return
        # Several scales: this backward's gradients are unscaled on their own before joining the
        # earlier ones, so each scale is checked and updated by its own overflows.
        params = self._params()
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        scaler.scale_loss(loss).backward(**kwargs)
        if accumulate:
            self._masters.accumulate_grads()
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
        if self._masters is not None:
            self._masters.gradients_for_step(self.mode.name, self.grad_accum == "storage")
        if self.steps == 0:
            self._check_boundaries_ran()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        update = self._update
        grads = update.final_grads(optimizer) if update is not None else \
            [p.grad for p in params if p.grad is not None]
        scale = self.scalers[0].scale
        # A fused optimizer unscales and skips inside its own kernel: no pass that rewrites every
        # gradient, and the inf/NaN flag is read back only once the step is queued. Clipping
        # needs the unscaled gradients first, so it takes the plain path.
        handoff = (len(self.scalers) == 1 and scale != 1.0 and clip_grad_norm is None
                   and bool(grads) and unscales_itself(optimizer) and update is None)
        if self.diagnostics is not None:
            self.diagnostics.before_update(optimizer)
        if len(self.scalers) > 1:
            found_per_loss = list(self._found_inf)
        elif handoff:
            found_per_loss = [step_unscaling_inside(optimizer, grads, scale)]
        elif scale != 1.0 or clip_grad_norm is None:
            found_per_loss = [self.scalers[0].unscale_(grads)]
        else:
            found_per_loss = [False]  # the norm below is the non-finite check
        grad_norm = None
        clip_inf = False
        if clip_grad_norm is not None:
            norm = clip_grads(grads, clip_grad_norm) if update is not None else \
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                               clip_grad_norm, foreach=True)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            clip_inf = not math.isfinite(grad_norm)
            if found_per_loss == [False] and scale == 1.0:  # the norm was the only check: one verdict
                clip_inf = bool(across_ranks(torch.tensor(float(clip_inf), device=self.device)).item())
        found = any(found_per_loss) or clip_inf
        if not found:
            if not isinstance(self.scalers[0], NoLossScaler):
                self._collapse.observe(grads, grad_norm, scale, self.steps + 1)
            if update is not None:
                update.step(optimizer)
            elif not handoff:
                optimizer.step()
            if self._masters is not None:
                self._masters.copy_to_model()
        elif self._buffers_before is not None and self.model is not None:
            with torch.no_grad():  # the skipped step's forward moved running statistics: undo
                for b, old in zip(self.model.buffers(), self._buffers_before):
                    b.copy_(old)
        self._buffers_before = None
        if self.diagnostics is not None:
            self.diagnostics.after_update(optimizer, applied=not found)
            self.last_diagnostics = self.diagnostics.end(scale)
            self._diag_started = False
        for i, scaler in enumerate(self.scalers):
            scaler.update(found_per_loss[i] or clip_inf)
        self._found_inf = [False] * len(self.scalers)
        optimizer.zero_grad(set_to_none=True)
        if update is not None:
            update.zero_grad()
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)
        self.steps += 1
        self.skipped_steps += int(found)
        return StepOutcome(skipped=found, scale=scale, grad_norm=grad_norm, found_inf=found)

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
        """The model's state dict with each low-precision parameter replaced by its FP32 master:
        the weights the optimizer really updates (what an EMA should average)."""
        if self.model is None:
            raise VlampError("MixedPrecision: call setup(model, optimizer) first")
        sd = self.model.state_dict()
        if self._masters is not None:
            for i, m in enumerate(self._masters.masters):
                sd[self._masters.name(i)] = m.detach()
        if self._update is not None:
            sd.update(self._update.exact_weights())
        return sd

    def sync_masters(self, weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Sets the FP32 masters from ``weights`` (e.g. a checkpoint's full-precision weights, by
        parameter name) or from the model's current weights. Call it after loading weights into
        the model by hand: otherwise the next step writes the masters' older values back."""
        if self._masters is not None:
            self._masters.set_from(dict(weights) if weights is not None else None)

    def _params(self) -> list[torch.Tensor]:
        if self.model is None:
            raise VlampError("MixedPrecision: call setup(model, optimizer) first")
        if self._masters is not None:
            return self._masters.trainable(self.model)
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- state -----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The current loss scale of the first loss."""
        return self.scalers[0].scale

    def state_dict(self) -> dict[str, Any]:
        """Mode, step counters, every scaler's state and the plan (plain data), plus FP32 master
        weights."""
        return {
            "mode": self.mode.name, "steps": self.steps, "skipped_steps": self.skipped_steps,
            "scalers": [{"type": type(s).__name__, **s.state_dict()} for s in self.scalers],
            "plan": self.plan.to_dict(),
            "tf32": self.tf32,
            "master_weights": self._masters.state_dict() if self._masters is not None else {},
            "update": self.update, "grad_accum": self.grad_accum,
            "update_tensors": self._update.state_dict() if self._update is not None else {},
        }

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
        if self._update is not None:
            self._update.load_state_dict(state.get("update_tensors") or {})
        masters = state.get("master_weights") or {}
        if self._masters is None:
            return
        if masters:
            try:
                self._masters.load_state_dict(masters)
                return
            except VlampError:
                pass  # saved for other parameters (another mode or plan)
        self._masters.set_from(None)  # from the model's weights, which the caller loaded

    def describe(self, max_depth: int | None = None):
        """The describe table of the model given to :meth:`setup`; after the first step, rules on
        modules that never ran their own forward are marked as changing storage only."""
        if self.model is None:
            raise VlampError("MixedPrecision.describe: call setup(model, optimizer) first")
        update = self.update if self.mode.master_weights else "master"
        table = self.plan.describe(self.model, max_depth=max_depth, uncalled=self.uncalled,
                                   update=update, moments=moments_per_param(self.optimizer))
        if self.low_precision_storage:
            table.notes.append(update_note(self.update, self.grad_accum))
        device = self.device_type
        fp32 = ("TF32 tensor cores (tf32=True)" if self.tf32 else "IEEE FP32 (tf32=False)") \
            if device == "cuda" else "IEEE FP32"
        table.notes.append(f"device {self.device}; FP32 matmuls and convolutions run in {fp32}")
        table.notes.extend(self.parallel_notes)
        return table

    def __repr__(self) -> str:
        return f"MixedPrecision(mode={self.mode.name!r}, scaler={type(self.scalers[0]).__name__})"

