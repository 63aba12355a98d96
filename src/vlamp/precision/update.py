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

One class per method behind :class:`~vlamp.precision.weight_update.WeightUpdate`:
:class:`NaiveUpdate`, :class:`KahanUpdate`, :class:`StochasticUpdate`. How a step runs
(:meth:`LowPrecisionUpdate.step`), in buckets of about ``bucket`` elements so the
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

import torch

from vlamp.precision.dtypes import LOW_PRECISION
from vlamp.precision.errors import VlampError
from vlamp.precision.master import MasterWeights
from vlamp.precision.weight_update import BUCKET, UpdateSettings, WeightUpdate, moments


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


class LowPrecisionUpdate(WeightUpdate):
    """Steps an optimizer whose low-precision parameters have no FP32 masters; rounds to nearest
    (the ``naive`` method). Subclasses change how the FP32 result is rounded back.

    Args:
        optimizer: The optimizer over the model's own parameters.
        names: Parameter id -> qualified name (for state dicts and messages).
        grad_accum: ``"fp32"`` or ``"storage"``: the dtype gradients of several micro-batches are
            summed in.
        bucket: Elements per optimizer call; bounds the transient FP32 copies.
        state8: Keep the optimizer's moments in 8 bits instead of the weight's dtype.

    Raises:
        VlampError: If the optimizer already stepped.
    """

    method = "naive"
    fused_handoff = False  # the optimizer steps bucket by bucket, on FP32 copies

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str],
                 grad_accum: str = "fp32", bucket: int = BUCKET, state8: bool = False) -> None:
        if optimizer.state:
            raise VlampError("MixedPrecision.setup: the optimizer already has state; "
                             "set it up before its first step")
        super().__init__(optimizer, names, state8=state8, bucket=bucket)
        self.grad_accum = grad_accum
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.low = [p for p in params if p.dtype in LOW_PRECISION and p.requires_grad]
        self.acc: dict[int, torch.Tensor] = {}  # fp32 gradient sums of earlier micro-batches
        self._low_ids = {id(p) for p in self.low}
        self.buckets = self._buckets(optimizer, lift_all=state8)

    def __len__(self) -> int:
        return len(self.low)

    # -- gradients ---------------------------------------------------------------------------------
    @torch.no_grad()
    def before_backward(self) -> None:
        """With FP32 accumulation, moves the gradients of the earlier micro-batches into FP32
        sums, so autograd does not add the next one in low precision. With one micro-batch
        nothing is allocated."""
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
    def grads(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The last micro-batch's gradient joins the FP32 sum; FP16 gradients become FP32 here,
        so unscaling them cannot underflow."""
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

    def clip(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
             max_norm: float) -> torch.Tensor:
        del optimizer
        self._refuse_clip()
        return clip_grads(grads, max_norm)

    def zero_grad(self) -> None:
        super().zero_grad()
        self.acc.clear()

    # -- the step ----------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, stepped: bool = False) -> None:
        """The optimizer's step over every parameter, bucket by bucket (see the module's text)."""
        if stepped:
            raise VlampError(f"{type(self).__name__}: a fused optimizer cannot step these weights itself")
        if self.in_backward:
            return
        self._step_in_buckets(optimizer, self.buckets)
        self.acc.clear()

    def _lifts(self, p: torch.Tensor) -> bool:
        return id(p) in self._low_ids or self.state8

    def _lift(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """``p``, its gradient and its optimizer state as FP32 for the optimizer's arithmetic."""
        dtype = p.dtype
        if id(p) in self._low_ids:
            grad = self.acc.pop(id(p), None)
            grad = grad if grad is not None else (p.grad.float() if p.grad is not None else None)
            value = self._exact_fp32(p)
            p.grad = None
            p.data = value
            p.grad = grad
        if self.state8:
            super()._lift(optimizer, p)
        else:
            for k, v in moments(optimizer, p):
                optimizer.state[p][k] = v.float()
        return p, dtype

    def _lower(self, optimizer: torch.optim.Optimizer, p: torch.Tensor, dtype: torch.dtype) -> None:
        """The updated FP32 values rounded back into ``dtype`` by the method."""
        if id(p) in self._low_ids:
            low = self._round(p, p.data, dtype)
            p.grad = None
            p.data = low
        if self.state8:
            super()._lower(optimizer, p, dtype)
        else:
            for k, v in moments(optimizer, p):
                optimizer.state[p][k] = v.to(dtype)

    def _exact_fp32(self, p: torch.Tensor) -> torch.Tensor:
        """A fresh FP32 copy of the weight the optimizer works on."""
        return p.data.float()

    def _slice_buffers(self, p: torch.Tensor, piece: torch.Tensor, a: int, b: int):
        """The slice is low precision like ``p``; its FP32 gradient sum is a view of ``p``'s."""
        if id(p) in self._low_ids:
            self._low_ids.add(id(piece))
        if id(p) in self.acc:
            self.acc[id(piece)] = self.acc[id(p)].view(-1)[a:b]

        def undo() -> None:
            self._low_ids.discard(id(piece))
            self.acc.pop(id(piece), None)
        return undo

    def _after_sliced(self, p: torch.Tensor) -> None:
        if id(p) in self._low_ids:  # as a whole step leaves it: the gradient is spent
            p.grad = None
            self.acc.pop(id(p), None)

    def _round(self, p: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``value`` (the updated FP32 weight of ``p``) in ``dtype``: round to nearest."""
        del p
        return value.to(dtype)


class NaiveUpdate(LowPrecisionUpdate):
    """Round to nearest, nothing kept: the reference the other methods are measured against."""


class KahanUpdate(LowPrecisionUpdate):
    """A compensation buffer ``c`` in the weight's dtype holds what rounding took off; the
    optimizer works on ``w + c``."""

    method = "kahan"

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str],
                 grad_accum: str = "fp32", bucket: int = BUCKET, state8: bool = False) -> None:
        super().__init__(optimizer, names, grad_accum, bucket, state8)
        self.compensation: dict[int, torch.Tensor] = {}  # id(p) -> buffer, made at the first step

    def _exact_fp32(self, p: torch.Tensor) -> torch.Tensor:
        value = p.data.float()
        c = self.compensation.get(id(p))
        return value.add_(c) if c is not None else value

    def _round(self, p: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        low = value.to(dtype)
        residual = value.sub_(low.float())
        c = self.compensation.get(id(p))
        if c is None:
            self.compensation[id(p)] = residual.to(dtype)
        else:
            c.copy_(residual)
        return low

    def _slice_buffers(self, p: torch.Tensor, piece: torch.Tensor, a: int, b: int):
        undo_low = super()._slice_buffers(p, piece, a, b)
        c = self.compensation.get(id(p))
        if c is not None:
            self.compensation[id(piece)] = c.view(-1)[a:b]

        def undo() -> None:
            made = self.compensation.pop(id(piece), None)
            if made is not None and c is None:  # the first step made the slice's buffer
                whole = self.compensation.setdefault(id(p), torch.zeros_like(p.data))
                whole.view(-1)[a:b].copy_(made.view(-1))
            undo_low()
        return undo

    def exact_weights(self) -> dict[str, torch.Tensor]:
        """``w + c`` in FP32 of every parameter that has a compensation buffer, by name."""
        return {self.name_of(p): self._exact_fp32(p).detach() for p in self.low
                if id(p) in self.compensation}

    @torch.no_grad()
    def sync_from(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Sets each compensation buffer to what rounding ``weights[name]`` into the stored weight
        took off (a resume from FP32 masters keeps their precision), or to zero without one."""
        weights = weights or {}
        for p in self.low:
            exact = weights.get(self.name_of(p))
            if exact is not None and exact.shape == p.shape and exact.dtype == torch.float32:
                self.compensation[id(p)] = (exact.to(p.device) - p.detach().float()).to(p.dtype)
            else:
                self.compensation.pop(id(p), None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The compensation buffers by parameter name (``kahan.NAME``)."""
        return {**super().state_dict(), **{f"kahan.{self.name_of(p)}": self.compensation[id(p)]
                                           for p in self.low if id(p) in self.compensation}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Buffers of parameters this model does not have are ignored; a missing one starts at
        zero."""
        super().load_state_dict(state)
        for p in self.low:
            saved = state.get(f"kahan.{self.name_of(p)}")
            if saved is not None and saved.shape == p.shape:
                self.compensation[id(p)] = saved.to(device=p.device, dtype=p.dtype).clone()

    def state_bytes(self) -> dict[str, int]:
        return {**super().state_bytes(),
                "compensation": sum(c.numel() * c.element_size() for c in self.compensation.values())}


class StochasticUpdate(LowPrecisionUpdate):
    """The updated value is rounded up or down at random, exact on average. BF16 storage only.

    Args:
        seed: Seed of the rounding generator (its state is saved and restored).

    Raises:
        VlampError: If a low-precision parameter is not BF16.
    """

    method = "stochastic"

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str],
                 grad_accum: str = "fp32", bucket: int = BUCKET, state8: bool = False,
                 seed: int = 0) -> None:
        super().__init__(optimizer, names, grad_accum, bucket, state8)
        other = next((p for p in self.low if p.dtype != torch.bfloat16), None)
        if other is not None:
            raise VlampError(f"update 'stochastic': {self.name_of(other)} is stored in "
                             f"{str(other.dtype).removeprefix('torch.')}; stochastic "
                             f"rounding is for bf16 storage. Use kahan or master for fp16")
        self.seed = seed
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None  # restored before the generator exists

    def _round(self, p: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        del p, dtype
        return stochastic_round(value, self._generator(value.device))

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device).manual_seed(self.seed)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
        return self.generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rounding generator's state (``generator``), once it exists."""
        state = self.generator.get_state() if self.generator is not None else self._generator_state
        return {**super().state_dict(), **({"generator": state} if state is not None else {})}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self._generator_state = state["generator"].cpu().clone()
            if self.generator is not None:
                self.generator.set_state(self._generator_state)


LOW_PRECISION_UPDATES: dict[str, type[LowPrecisionUpdate]] = {
    "naive": NaiveUpdate, "kahan": KahanUpdate, "stochastic": StochasticUpdate}


def weight_update_for(optimizer: torch.optim.Optimizer, settings: UpdateSettings,
                      names: dict[int, str], mode_name: str) -> WeightUpdate:
    """The one place update settings become a :class:`WeightUpdate`: FP32 masters
    (``master``; the plain update where no parameter is stored in low precision), or the named
    low-precision method.

    Raises:
        VlampError: If the method is not ``master`` and no parameter is stored in low precision.
    """
    state8 = settings.optimizer_state == "8bit"
    if settings.method == "master":
        masters = MasterWeights(optimizer, names, settings.grad_accum, mode_name, state8=state8)
        return masters if len(masters) else WeightUpdate(optimizer, names, state8=state8)
    cls = LOW_PRECISION_UPDATES[settings.method]
    extra = {"seed": settings.seed} if settings.method == "stochastic" else {}
    update = cls(optimizer, names, settings.grad_accum, state8=state8, **extra)
    if not len(update):
        raise VlampError(f"MixedPrecision: update={settings.method!r} is for weights stored in low "
                         f"precision, and {mode_name} stores none; use a -true mode or a "
                         f"params=bf16 rule, or update='master'")
    return update



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

