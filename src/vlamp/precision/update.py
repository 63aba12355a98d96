"""Updating weights stored in low precision without FP32 masters, for any torch optimizer.

A weight stored in BF16 has 8 significant bits: an update below half a unit in its last place
(1/512 of the weight) is rounded away, so a plain BF16 optimizer step loses most late-training
updates. FP32 masters (:mod:`vlamp.precision.master`) keep them at 4 more bytes per parameter.
The methods here keep them, or keep them on average, with less:

* ``kahan``: a compensation buffer ``c`` in the weight's dtype holds what rounding took off; the
  optimizer sees ``w + c`` and the next rounding starts from there (Kahan summation; Zamirai et al.
  2020, "Revisiting BFloat16 Training"). 2 more bytes per parameter.
* ``stochastic``: the updated value is rounded up or down at random, with the probability that
  makes the rounding exact on average (Gupta et al. 2015). No extra bytes; BF16 storage only.
* ``naive``: round to nearest, nothing kept. The reference the two others are measured against.

How a step runs (:meth:`LowPrecisionUpdate.step`), in buckets of about ``bucket`` elements so the
FP32 copies are transient and small::

    for each bucket of parameters:
        w32 = w.float() (+ c.float() for kahan);  g32 = grad.float();  state32 = state.float()
        optimizer.step()                 # only this bucket's parameters, in FP32 arithmetic
        w = round(w32_new)               # nearest, or stochastic
        c = (w32_new - w.float()).to(w.dtype)       # kahan only
        state = state32.to(w.dtype)      # optimizer moments kept in the weight's dtype

Parameters kept in FP32 by the plan (norms, the action output) are stepped as they are. The
optimizer's moments of a low-precision parameter are stored in its dtype (BF16 moments), so AdamW
holds 2 (weight) + 2 (gradient) + 4 (moments) = 8 bytes per parameter (10 with kahan) against 16
in FP32.

Gradients of several micro-batches are accumulated in FP32 (``grad_accum="fp32"``: a transient
FP32 buffer per parameter once a second micro-batch arrives) or in the weight's dtype
(``"storage"``: each micro-batch's gradient is rounded into the sum).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from vlamp.precision.dtypes import LOW_PRECISION
from vlamp.precision.errors import VlampError

Update = Literal["master", "kahan", "stochastic", "naive"]
UPDATES: tuple[str, ...] = ("master", "kahan", "stochastic", "naive")
GRAD_ACCUMS: tuple[str, ...] = ("fp32", "storage")
BUCKET = 1 << 20  # elements per optimizer call: 4 MiB of each FP32 tensor kind


def check_update(update: str, grad_accum: str, where: str = "MixedPrecision") -> None:
    """Raises a :class:`VlampError` naming the legal values when either name is unknown."""
    if update not in UPDATES:
        raise VlampError(f"{where}: unknown update {update!r}; legal: {', '.join(UPDATES)}")
    if grad_accum not in GRAD_ACCUMS:
        raise VlampError(f"{where}: unknown grad_accum {grad_accum!r}; legal: {', '.join(GRAD_ACCUMS)}")


@torch.no_grad()
def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (FP32) rounded to BF16 up or down at random: a value a fraction ``f`` of the way
    from one BF16 number to the next becomes the next with probability ``f``, so the rounding is
    exact in expectation. BF16 is the top half of an FP32's bits: adding a uniform 16-bit integer
    to the bits and truncating does it (magnitudes round away from zero with probability ``f``,
    the sign bit untouched)."""
    bits = x.view(torch.int32)  # same strides: a channels-last weight stays channels-last
    noise = torch.empty_like(bits).random_(0, 1 << 16, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class LowPrecisionUpdate:
    """Steps an optimizer whose low-precision parameters have no FP32 masters.

    Args:
        optimizer: The optimizer over the model's own parameters.
        method: ``"kahan"``, ``"stochastic"`` or ``"naive"``.
        names: Parameter id -> qualified name (for state dicts and messages).
        grad_accum: ``"fp32"`` or ``"storage"``: the dtype gradients of several micro-batches are
            summed in.
        seed: Seed of the stochastic-rounding generator (its state is saved and restored).
        bucket: Elements per optimizer call; bounds the transient FP32 copies.

    Raises:
        VlampError: If the optimizer already stepped, or stochastic rounding is asked for a
            parameter that is not BF16.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: str, names: dict[int, str],
                 grad_accum: str = "fp32", seed: int = 0, bucket: int = BUCKET) -> None:
        check_update(method, grad_accum)
        if method == "master":
            raise VlampError("LowPrecisionUpdate: 'master' updates are MasterWeights' job")
        if optimizer.state:
            raise VlampError("MixedPrecision.setup: the optimizer already has state; "
                             "set it up before its first step")
        self.method, self.grad_accum, self.names, self.seed = method, grad_accum, names, seed
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.low = [p for p in params if p.dtype in LOW_PRECISION]
        if method == "stochastic":
            other = next((p for p in self.low if p.dtype != torch.bfloat16), None)
            if other is not None:
                raise VlampError(f"update 'stochastic': {self.name(other)} is stored in "
                                 f"{str(other.dtype).removeprefix('torch.')}; stochastic "
                                 f"rounding is for bf16 storage. Use kahan or master for fp16")
        self.compensation: dict[int, torch.Tensor] = {}  # kahan: id(p) -> buffer, made at first step
        self.acc: dict[int, torch.Tensor] = {}  # fp32 gradient sums of earlier micro-batches
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None  # restored before the generator exists
        self.buckets = _buckets(params, {id(p) for p in self.low}, bucket)

    def __len__(self) -> int:
        return len(self.low)

    def name(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), "parameter")

    # -- gradients ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_grads(self) -> None:
        """Before a micro-batch's backward: with FP32 accumulation, moves the gradients of the
        earlier micro-batches into FP32 sums, so autograd does not add the next one in low
        precision. With one micro-batch nothing is allocated."""
        if self.grad_accum != "fp32":
            return
        for p in self.low:
            if p.grad is None:
                continue
            i = id(p)
            if i in self.acc:
                self.acc[i].add_(p.grad)
            else:
                self.acc[i] = p.grad.float()
            p.grad = None

    @torch.no_grad()
    def final_grads(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The step's gradients, one per parameter that has one, for unscaling, the non-finite
        check and clipping (changed in place). The last micro-batch's gradient joins the FP32
        sum; FP16 gradients become FP32 here, so unscaling them cannot underflow."""
        out = []
        for g in optimizer.param_groups:
            for p in g["params"]:
                i = id(p)
                if i in self.acc:
                    if p.grad is not None:
                        self.acc[i].add_(p.grad)
                        p.grad = None
                    out.append(self.acc[i])
                elif p.grad is not None:
                    if p.grad.dtype == torch.float16:
                        self.acc[i] = p.grad.float()
                        p.grad = None
                        out.append(self.acc[i])
                    else:
                        out.append(p.grad)
        return out

    def zero_grad(self) -> None:
        self.acc.clear()

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step over every parameter, bucket by bucket (see the module's text)."""
        groups = [g["params"] for g in optimizer.param_groups]
        try:
            for bucket in self.buckets:
                members = {id(p) for p in bucket}
                for g, params in zip(optimizer.param_groups, groups):
                    g["params"] = [p for p in params if id(p) in members]
                lifted = [self._lift(optimizer, p) for p in bucket if p.dtype in LOW_PRECISION]
                optimizer.step()
                for p, dtype in lifted:
                    self._lower(optimizer, p, dtype)
        finally:
            for g, params in zip(optimizer.param_groups, groups):
                g["params"] = params
        self.acc.clear()

    def _lift(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """``p``, its gradient and its optimizer state as FP32 for the optimizer's arithmetic."""
        dtype, i = p.dtype, id(p)
        grad = self.acc.pop(i, None)
        grad = grad if grad is not None else (p.grad.float() if p.grad is not None else None)
        value = p.data.float()
        if self.method == "kahan" and i in self.compensation:
            value.add_(self.compensation[i])
        p.grad = None
        p.data = value
        p.grad = grad
        for k, v in _moments(optimizer, p):
            optimizer.state[p][k] = v.float()
        return p, dtype

    def _lower(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, dtype: torch.dtype) -> None:
        """The updated FP32 values rounded back into ``dtype`` by the method."""
        value = p.data
        if self.method == "stochastic":
            low = stochastic_round(value, self._generator(value.device))
        else:
            low = value.to(dtype)
        if self.method == "kahan":
            c = self.compensation.get(id(p))
            residual = value.sub_(low.float())
            if c is None:
                self.compensation[id(p)] = residual.to(dtype)
            else:
                c.copy_(residual)
        p.grad = None
        p.data = low
        for k, v in _moments(optimizer, p):
            optimizer.state[p][k] = v.to(dtype)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device).manual_seed(self.seed)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
        return self.generator

    # -- what the weights really are, and state ----------------------------------------------------
    def exact(self, p: torch.Tensor) -> torch.Tensor:
        """The weight the optimizer works on: ``w + c`` in FP32 for kahan, else ``w``."""
        c = self.compensation.get(id(p))
        return p.detach().float().add_(c) if c is not None else p.detach()

    def exact_weights(self) -> dict[str, torch.Tensor]:
        """:meth:`exact` of every parameter that has a compensation buffer, by name."""
        return {self.name(p): self.exact(p) for p in self.low if id(p) in self.compensation}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The compensation buffers by parameter name (``kahan.NAME``) and the stochastic-rounding
        generator's state (``generator``)."""
        out = {f"kahan.{self.name(p)}": self.compensation[id(p)] for p in self.low
               if id(p) in self.compensation}
        state = self.generator.get_state() if self.generator is not None else self._generator_state
        if state is not None:
            out["generator"] = state
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`. Buffers of parameters this model does not have are ignored;
        a missing buffer starts at zero (a resume from another method)."""
        for p in self.low:
            saved = state.get(f"kahan.{self.name(p)}")
            if saved is not None and saved.shape == p.shape and self.method == "kahan":
                self.compensation[id(p)] = saved.to(device=p.device, dtype=p.dtype).clone()
        if "generator" in state:
            self._generator_state = state["generator"].cpu().clone()
            if self.generator is not None:
                self.generator.set_state(self._generator_state)


def low_precision_updates(optimizer: torch.optim.Optimizer, method: str, names: dict[int, str],
                          grad_accum: str, seed: int, mode_name: str):
    """What updates the optimizer's low-precision parameters: FP32 masters (``method="master"``;
    ``None`` when no parameter is stored in low precision) or a :class:`LowPrecisionUpdate`.

    Raises:
        VlampError: If ``method`` is not ``master`` and no parameter is stored in low precision.
    """
    from vlamp.precision.master import MasterWeights

    if method == "master":
        masters = MasterWeights(optimizer, names)
        return masters if len(masters) else None
    update = LowPrecisionUpdate(optimizer, method, names, grad_accum, seed=seed)
    if not len(update):
        raise VlampError(f"MixedPrecision: update={method!r} is for weights stored in low precision, "
                         f"and {mode_name} stores none; use a -true mode or a params=bf16 rule, or "
                         f"update='master'")
    return update


def update_note(update: str, grad_accum: str) -> str:
    """The line ``describe`` prints under the table about how low-precision weights are updated."""
    how = {"master": "FP32 masters", "kahan": "Kahan-compensated, moments in the weight's dtype",
           "stochastic": "stochastic rounding, moments in the weight's dtype",
           "naive": "round to nearest, moments in the weight's dtype"}[update]
    return (f"low-precision weights updated by {update} ({how}); gradients of several "
            f"micro-batches summed in {grad_accum}")


def clip_grads(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scales ``grads`` in place so their total 2-norm is at most ``max_norm`` (what
    ``clip_grad_norm_`` does to parameters' ``.grad``, for gradients held apart from them, as the
    FP32 sums here are); returns the norm before clipping, computed in FP32."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                 for g in grads])) if grads else torch.tensor(0.0)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def moments_per_param(optimizer: torch.optim.Optimizer | None) -> int:
    """Per-element state tensors the optimizer keeps for a parameter: counted from its state once
    it has stepped, else known for torch's common optimizers (AdamW 2, SGD with momentum 1), else 2."""
    if optimizer is None:
        return 2
    for p, st in optimizer.state.items():
        return sum(1 for _ in _moments(optimizer, p))
    d = optimizer.defaults
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 if d.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if d.get("momentum") else 0
    if isinstance(optimizer, (torch.optim.RMSprop, torch.optim.Adagrad)):
        return 1
    return 2


def _moments(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The per-element state tensors of ``p`` (AdamW's ``exp_avg`` and ``exp_avg_sq``, SGD's
    ``momentum_buffer``, ...): floating tensors of its shape, never the step count."""
    for k, v in list(optimizer.state.get(p, {}).items()):
        if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
            yield k, v


def _buckets(params: list[torch.Tensor], low: set[int], size: int) -> list[list[torch.Tensor]]:
    """FP32 parameters in one call (nothing is copied for them); the low-precision ones in
    buckets of about ``size`` elements."""
    out: list[list[torch.Tensor]] = []
    plain = [p for p in params if id(p) not in low]
    if plain:
        out.append(plain)
    current: list[torch.Tensor] = []
    count = 0
    for p in params:
        if id(p) not in low:
            continue
        current.append(p)
        count += p.numel()
        if count >= size:
            out.append(current)
            current, count = [], 0
    if current:
        out.append(current)
    return out
