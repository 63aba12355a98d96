"""How an optimizer's step reaches the model's weights: one interface, one class per method.

Every method of updating weights answers the same questions in the same order, once per
micro-batch and once per step, so :meth:`MixedPrecision.step` has one path for all of them::

    for each micro-batch:
        update.before_backward();  loss.backward();  update.after_backward()
    grads = update.grads(optimizer)             # the tensors to unscale, check and clip
    update.clip(optimizer, grads, max_norm)     # optional
    update.step(optimizer)                      # or update.step(optimizer, stepped=True) after a
                                                # fused optimizer stepped itself
    update.zero_grad()

The methods (``UpdateSettings.method``):

* no weight stored in low precision: :class:`WeightUpdate` itself — the optimizer updates the
  model's FP32 parameters;
* ``master``: :class:`~vlamp.precision.master.MasterWeights` — FP32 copies the optimizer updates,
  rounded into the model after each step;
* ``kahan``, ``stochastic``, ``naive``: :class:`~vlamp.precision.update.LowPrecisionUpdate` — the
  low-precision weights are updated themselves, with a compensation buffer, stochastic rounding or
  round to nearest.

:func:`vlamp.precision.update.weight_update_for` is the one place settings become one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal

import torch

from vlamp.precision.errors import VlampError
from vlamp.precision.state8 import BLOCK, dequantize, is_signed, quantize

Method = Literal["auto", "master", "kahan", "stochastic", "naive"]
UPDATES: tuple[str, ...] = ("master", "kahan", "stochastic", "naive")  # the methods themselves
GRAD_ACCUMS: tuple[str, ...] = ("fp32", "storage")
OPTIMIZER_STATES: tuple[str, ...] = ("auto", "8bit")
BUCKET = 1 << 20  # elements per optimizer call on a bucketed step: 4 MiB of each FP32 tensor kind


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """How weights the plan stores in low precision are updated: one frozen value.

    Args:
        method: ``"auto"`` (the default: the mode's own, ``Mode.default_update``: FP32 masters,
            or stochastic rounding in ``bf16-storage``), ``"master"`` (FP32 master copies),
            ``"kahan"`` (a compensation buffer in the weight's dtype), ``"stochastic"``
            (stochastic rounding into BF16) or ``"naive"`` (round to nearest). Without masters
            the optimizer's moments are kept in the weight's dtype. See
            :mod:`vlamp.precision.update`.
        grad_accum: The dtype gradients of several micro-batches are summed in: ``"fp32"``
            (default) or ``"storage"`` (the weight's dtype).
        seed: Seed of the stochastic-rounding generator (its state is saved with the run).
        optimizer_state: ``"auto"`` (the method's: FP32 beside FP32 weights and masters, the
            weight's dtype without masters) or ``"8bit"`` (block-wise quantized moments,
            :mod:`vlamp.precision.state8`, with any method: the optimizer steps a bucket at a
            time on FP32 copies).
        in_backward: Step each parameter as soon as its gradient is complete, inside the
            backward, and free the gradient (:meth:`WeightUpdate.step_in_backward`): gradients
            never coexist, so they hold one parameter's bytes instead of 2-4 per parameter. One
            micro-batch per step, no clipping by the global norm and no loss scaler (they need
            every gradient before any step); FP32 weights or a method without masters.

    Raises:
        VlampError: On an unknown method or grad_accum; the message lists the legal values.

    Example:
        >>> UpdateSettings("kahan", grad_accum="storage").method
        'kahan'
    """

    method: Method = "auto"
    grad_accum: Literal["fp32", "storage"] = "fp32"
    seed: int = 0
    optimizer_state: Literal["auto", "8bit"] = "auto"
    in_backward: bool = False

    def __post_init__(self) -> None:
        check_update(self.method, self.grad_accum, where="UpdateSettings")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise VlampError(f"UpdateSettings: unknown optimizer_state {self.optimizer_state!r}; "
                             f"legal: {', '.join(OPTIMIZER_STATES)}")
        object.__setattr__(self, "seed", int(self.seed))

    def resolved(self, default: str) -> UpdateSettings:
        """These settings with ``"auto"`` replaced by ``default`` (the mode's method)."""
        return dataclasses.replace(self, method=default) if self.method == "auto" else self

    def describe(self) -> str:
        """The line ``describe`` prints under the table about how low-precision weights are updated."""
        how = {"auto": "the mode's own method", "master": "FP32 masters", "kahan": "Kahan-compensated, moments in the weight's dtype",
               "stochastic": "stochastic rounding, moments in the weight's dtype",
               "naive": "round to nearest, moments in the weight's dtype"}[self.method]
        state = "; optimizer moments in 8 bits (block-wise)" if self.optimizer_state == "8bit" else ""
        state += "; each weight stepped inside the backward" if self.in_backward else ""
        return (f"low-precision weights updated by {self.method} ({how}); gradients of several "
                f"micro-batches summed in {self.grad_accum}{state}")


def check_update(update: str, grad_accum: str, where: str = "MixedPrecision") -> None:
    """Raises a :class:`VlampError` naming the legal values when either name is unknown."""
    if update not in ("auto", *UPDATES):
        raise VlampError(f"{where}: unknown update {update!r}; legal: auto, {', '.join(UPDATES)}")
    if grad_accum not in GRAD_ACCUMS:
        raise VlampError(f"{where}: unknown grad_accum {grad_accum!r}; legal: {', '.join(GRAD_ACCUMS)}")


def mode_label(mode: str, update: str = "auto", optimizer_state: str = "auto") -> str:
    """A mode with its update and optimizer state, as ``vlamp bench --modes`` spells it, in the
    shortest spelling: ``("bf16-true", "kahan", "8bit")`` -> ``"bf16-true/kahan+8bit"``;
    ``master`` is the ``-true`` modes' own update (not ``bf16-storage``'s) and is left out."""
    own = update == "auto" or (update == "master" and mode.endswith("-true"))
    return (mode + ("" if own else f"/{update}")
            + (f"+{optimizer_state}" if optimizer_state != "auto" else ""))


class WeightUpdate:
    """The optimizer updates the model's own parameters: what FP32 storage needs, and the hooks
    every other method overrides where it differs.

    With ``state8`` the optimizer's moments live here between steps, quantized to 8 bits, and
    :meth:`step` runs the optimizer a bucket of parameters at a time on FP32 copies of them.

    Args:
        optimizer: The optimizer over the model's parameters, not stepped yet.
        names: Parameter id -> qualified name (for state dicts and messages).
        state8: Keep the optimizer's moments in 8 bits.
        bucket: Elements per optimizer call on a bucketed step; bounds the transient FP32 copies.
    """

    #: Whether a fused optimizer may unscale and step inside its own kernel (the gradients it
    #: reads are the ones this update hands back, and its step is the whole update).
    fused_handoff = True
    #: Set by :meth:`step_in_backward`: the step is taken parameter by parameter in the backward.
    in_backward = False

    def __init__(self, optimizer: torch.optim.Optimizer | None, names: dict[int, str] | None = None,
                 state8: bool = False, bucket: int = BUCKET) -> None:
        self.names = names or {}
        self.state8 = state8
        self.packed: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # id(p) -> key ->
        self.bucket = bucket
        self._all_buckets: list[list[torch.Tensor]] | None = None
        if state8:
            self.fused_handoff = False  # the step is bucketed: no single fused call to hand off

    def __len__(self) -> int:
        """How many parameters this method holds apart from a plain optimizer step (0 here)."""
        return 0

    # -- gradients ---------------------------------------------------------------------------------
    def before_backward(self) -> None:
        """Called before each micro-batch's backward."""

    def after_backward(self) -> None:
        """Called after each micro-batch's backward."""

    def trainable(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The tensors a backward's gradients land in, for ``model``."""
        return [p for p in model.parameters() if p.requires_grad]

    def grads(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The step's gradients, one per parameter that has one: unscaled, checked and clipped in
        place by the caller."""
        return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]

    def clip(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
             max_norm: float) -> torch.Tensor:
        """Clips the step's gradients to total norm ``max_norm``; returns the norm before. Works on
        the optimizer's parameters, so sharded (DTensor) gradients clip by their global norm."""
        self._refuse_clip()
        del grads
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def _refuse_clip(self) -> None:
        if self.in_backward:
            raise VlampError("step in the backward: each weight is stepped when its gradient is "
                             "made, so there is no global norm to clip by; turn clipping off "
                             "(train.clip_grad_norm=0) or precision.step_in_backward=false")

    # -- the step ----------------------------------------------------------------------------------
    def step_in_backward(self, optimizer: torch.optim.Optimizer) -> None:
        """From now on each parameter is stepped the moment its gradient is complete (a
        post-accumulate-grad hook: the optimizer over that one parameter, in slices if it is
        larger than a bucket), and the gradient freed; :meth:`step` then has nothing left to do.
        The gradients of a backward never coexist. Learning rates set on the optimizer's groups
        before the backward apply, as they would to a step after it."""
        self.in_backward = True
        self._fired: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(
                    lambda p, optimizer=optimizer: self._step_now(optimizer, p))

    def _step_now(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
        if id(p) in self._fired:
            raise VlampError("step in the backward: a second backward before the step reached "
                             f"{self.name_of(p)}; it steps each weight at its gradient, so use one "
                             f"micro-batch per step (train.grad_accum=1)")
        self._fired.add(id(p))
        self._step_in_buckets(optimizer, [[p]])
        p.grad = None

    def step(self, optimizer: torch.optim.Optimizer, stepped: bool = False) -> None:
        """Applies the step; ``stepped`` when a fused optimizer already ran its own."""
        if stepped or self.in_backward:
            return
        if self.state8:
            if self._all_buckets is None:  # the parameters are fixed once set up: bucket them once
                self._all_buckets = self._buckets(optimizer, lift_all=True)
            self._step_in_buckets(optimizer, self._all_buckets)
        else:
            optimizer.step()

    @torch.no_grad()
    def _step_in_buckets(self, optimizer: torch.optim.Optimizer,
                         buckets: list[list[torch.Tensor]]) -> None:
        """``optimizer.step()`` over one bucket of parameters at a time, each lifted to what the
        optimizer's arithmetic needs (:meth:`_lift`) and lowered after (:meth:`_lower`)."""
        groups = [g["params"] for g in optimizer.param_groups]
        try:
            for bucket in buckets:
                if len(bucket) == 1 and self._too_big(bucket[0]):
                    self._step_sliced(optimizer, bucket[0], groups)
                    continue
                members = {id(p) for p in bucket}
                for g, params in zip(optimizer.param_groups, groups):
                    g["params"] = [p for p in params if id(p) in members]
                lifted = [self._lift(optimizer, p) for p in bucket if self._lifts(p)]
                optimizer.step()
                for p, dtype in lifted:
                    self._lower(optimizer, p, dtype)
        finally:
            for g, params in zip(optimizer.param_groups, groups):
                g["params"] = params

    def _buckets(self, optimizer: torch.optim.Optimizer, lift_all: bool) -> list[list[torch.Tensor]]:
        """The parameters in buckets of about ``bucket`` elements: those :meth:`_lifts` (all of
        them with ``lift_all``); the rest together in one call, where nothing is copied."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        lifted = [p for p in params if lift_all or self._lifts(p)]
        ids = {id(p) for p in lifted}
        out: list[list[torch.Tensor]] = [[p for p in params if id(p) not in ids]]
        current: list[torch.Tensor] = []
        count = 0
        for p in lifted:
            if self._too_big(p):  # stepped alone, a slice at a time
                out.append([p])
                continue
            current.append(p)
            count += p.numel()
            if count >= self.bucket:
                out.append(current)
                current, count = [], 0
        return [b for b in (*out, current) if b]

    def _lifts(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is lifted for a bucketed step (every parameter, with 8-bit state)."""
        return self.state8

    def _too_big(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is lifted and larger than a bucket (a contiguous one: it is sliced)."""
        return p.numel() > self.bucket and self._lifts(p) and p.is_contiguous()

    @torch.no_grad()
    def _step_sliced(self, optimizer: torch.optim.Optimizer, p: torch.Tensor,
                     groups: list[list[torch.Tensor]]) -> None:
        """Steps ``p`` a block-aligned slice of about ``bucket`` elements at a time, so its FP32
        copies are one slice's (pi0's 527 M-element embedding would need 8 GB at once). Each slice
        is a view of ``p`` standing in for it, with views of its gradient, moments, 8-bit codes
        and the method's buffers (:meth:`_slice_buffers`); the optimizer's arithmetic is
        elementwise, so every element gets the update it would have got in one piece."""
        size = max(BLOCK, self.bucket // BLOCK * BLOCK)
        state = optimizer.state.pop(p, {})
        packed = self.packed.pop(id(p), {})
        full: dict[str, torch.Tensor] = {}  # moments (and 8-bit codes/scales) of the whole of p
        flat = p.data.view(-1)
        grad = p.grad
        slot = next(i for i, params in enumerate(groups) if any(q is p for q in params))
        n_blocks = -(-p.numel() // BLOCK)
        step = state.get("step")  # before the first step there is none, and no moments either
        stepped = step
        for a in range(0, p.numel(), size):
            b = min(p.numel(), a + size)
            piece = torch.nn.Parameter(flat[a:b])
            piece.grad = grad.view(-1)[a:b] if grad is not None else None
            optimizer.state[piece] = {k: v.view(-1)[a:b] for k, v in state.items()
                                      if k != "step" and v.shape == p.shape}
            if step is not None:
                optimizer.state[piece]["step"] = step.clone()
            blocks = slice(a // BLOCK, -(-b // BLOCK))
            self.packed[id(piece)] = {k: (codes[a:blocks.stop * BLOCK], absmax[blocks])
                                      for k, (codes, absmax) in packed.items()}
            undo = self._slice_buffers(p, piece, a, b)
            for i, g in enumerate(optimizer.param_groups):
                g["params"] = [piece] if i == slot else []
            lifted = self._lift(optimizer, piece)
            optimizer.step()
            self._lower(optimizer, *lifted)
            flat[a:b].copy_(piece.data)
            for k, v in optimizer.state.pop(piece).items():
                if k == "step":
                    stepped = v
                    continue
                full.setdefault(k, torch.empty(p.numel(), dtype=v.dtype, device=v.device))[a:b].copy_(
                    v.view(-1))
            for k, (codes, absmax) in self.packed.pop(id(piece), {}).items():
                if k in packed:
                    continue  # lowered in place, into views of p's own codes
                full.setdefault(f"{k}.codes", codes.new_empty(n_blocks * BLOCK))[
                    a:a + codes.numel()].copy_(codes)
                full.setdefault(f"{k}.absmax", absmax.new_empty(n_blocks))[blocks].copy_(absmax)
            undo()
        codes = {k.removesuffix(".codes") for k in full if k.endswith(".codes")}
        if codes or packed:
            self.packed[id(p)] = {**packed, **{k: (full.pop(f"{k}.codes"), full.pop(f"{k}.absmax"))
                                               for k in codes}}
        optimizer.state[p] = {**({"step": stepped} if stepped is not None else {}),
                              **{k: v.view(p.shape) for k, v in full.items()}}
        self._after_sliced(p)

    def _slice_buffers(self, p: torch.Tensor, piece: torch.Tensor, a: int, b: int):
        """Gives ``piece`` (elements ``a:b`` of ``p``) views of the method's own buffers of ``p``;
        returns what copies them back and forgets ``piece``."""
        del p, piece, a, b
        return lambda: None

    def _after_sliced(self, p: torch.Tensor) -> None:
        """After every slice of ``p`` is stepped."""
        del p

    def _lift(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """Before the bucket's step: the optimizer's state of ``p`` in FP32."""
        for k, (codes, absmax) in self.packed.get(id(p), {}).items():  # kept: lowered into
            optimizer.state[p][k] = dequantize(codes, absmax, is_signed(k), p)
        return p, p.dtype

    def _lower(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, dtype: torch.dtype) -> None:
        """After the bucket's step: the state of ``p`` quantized back into 8 bits."""
        del dtype
        if not self.state8:
            return
        packed = self.packed.setdefault(id(p), {})
        for k, v in list(moments(optimizer, p)):
            packed[k] = quantize(v, is_signed(k), out=packed.get(k))  # into the codes it had
            del optimizer.state[p][k]

    def zero_grad(self) -> None:
        """Drops whatever gradients the method holds apart from the parameters."""
        if self.in_backward:
            self._fired.clear()

    def to(self, device: torch.device) -> None:
        """Moves what the method holds apart from the model to ``device``."""
        del device

    def lost_parameters(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the optimizer updates tensors the model no longer holds (a move from or to the
        meta device replaces parameters instead of moving them)."""
        held = {id(p) for p in model.parameters()}
        return any(id(p) not in held for p in self._tracked(optimizer))

    def _tracked(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"]]

    # -- what the weights really are, and state ----------------------------------------------------
    def exact_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the weight the optimizer really works on, where that is not the
        model's own tensor (FP32 masters, Kahan's ``w + c``)."""
        return {}

    def sync_from(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Sets what the method holds from ``weights`` (by name) or from the model's weights."""
        del weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must keep for an exact resume: here the 8-bit moments, as
        ``state8.NAME.KEY.codes`` and ``.absmax``."""
        return {f"state8.{self.name_of_id(i)}.{k}.{part}": t for i, kinds in self.packed.items()
                for k, pair in kinds.items() for part, t in zip(("codes", "absmax"), pair)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`; entries of parameters this model lacks are ignored."""
        if not self.state8:
            return
        ids = {name: i for i, name in self.names.items()}
        for key, t in state.items():
            if not key.startswith("state8."):
                continue
            name, k, part = key.removeprefix("state8.").rsplit(".", 2)
            if name in ids:
                pair = self.packed.setdefault(ids[name], {}).get(k, (None, None))
                pair = (t.clone(), pair[1]) if part == "codes" else (pair[0], t.clone())
                self.packed[ids[name]][k] = pair

    def masters_state(self) -> dict[str, torch.Tensor]:
        """FP32 master weights by parameter name, where the method keeps them."""
        return {}

    def load_masters(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`masters_state`."""
        del state

    def state_bytes(self) -> dict[str, int]:
        """Bytes held beside the model and the optimizer, by kind (``compensation``,
        ``optimizer``: the 8-bit moments)."""
        return {"optimizer": sum(t.numel() * t.element_size() for kinds in self.packed.values()
                                 for pair in kinds.values() for t in pair)}

    def name_of(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), "parameter")

    def name_of_id(self, i: int) -> str:
        return self.names.get(i, f"parameter{i}")


def moments_per_param(optimizer: torch.optim.Optimizer | None) -> int:
    """Per-element state tensors the optimizer keeps for a parameter: counted from its state once
    it has stepped, else known for torch's common optimizers (AdamW 2, SGD with momentum 1), else 2."""
    if optimizer is None:
        return 2
    for p in optimizer.state:
        return sum(1 for _ in moments(optimizer, p))
    d = optimizer.defaults
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 if d.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if d.get("momentum") else 0
    if isinstance(optimizer, (torch.optim.RMSprop, torch.optim.Adagrad)):
        return 1
    return 2


def moments(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The per-element state tensors of ``p`` (AdamW's ``exp_avg`` and ``exp_avg_sq``, SGD's
    ``momentum_buffer``, ...): floating tensors of its shape, never the step count."""
    for k, v in list(optimizer.state.get(p, {}).items()):
        if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
            yield k, v


__all__ = ["GRAD_ACCUMS", "UPDATES", "UpdateSettings", "WeightUpdate", "check_update",
           "mode_label", "moments", "moments_per_param"]
