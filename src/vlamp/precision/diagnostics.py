"""Numerical health per module, on sampled steps: where low precision overflows, underflows or
rounds updates away.

On a sampled step every watched module reports, for its forward output (activations) and for the
gradient flowing back into that output:

- ``overflow``: fraction of values that are inf/NaN;
- ``underflow``: fraction that are zero or subnormal in the dtype the tensor is held in (the
  module's compute dtype for a low-precision layer): below its smallest normal number (FP16 flushes
  below 2^-24 and loses bits below 2^-14). Structural zeros (masked positions) count too, so read
  it against an FP32 run or against the loss scaler's effect;
- ``headroom_bits``: log2 of the format's largest value over the largest magnitude seen (0 bits:
  at the edge of overflow, or past it; FP16's largest value is 65504; ``None`` when all were zero);

and, for each module's parameters, ``lost_updates``: the fraction of elements that had a non-zero
gradient but did not move in the step, in the tensor the optimizer updates (an FP32 master where
the plan keeps one): an update below half a unit in the last place of the weight, rounded away.

Cost: on steps that are not sampled, one attribute test per watched module call. On a sampled step,
a few reductions per tensor, kept on the device and read back once at the end of the step.

Use in any loop::

    diag = Diagnostics(every=50)
    diag.attach(model)                       # or MixedPrecision(..., diagnostics="every:50")
    diag.begin(step); loss = model(batch); loss.backward()
    diag.before_update(optimizer); optimizer.step(); diag.after_update(optimizer)
    record = diag.end(loss_scale)            # a dict on sampled steps, else None
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlamp.precision.apply import map_tensors
from vlamp.precision.dtypes import dtype_name
from vlamp.precision.errors import VlampError

ROOT = "(root)"  # the name the model itself is recorded under


def parse_every(spec: str | int | None, what: str = "diagnostics") -> int:
    """``"off"``/``None``/0 -> 0; ``"every:50"`` or 50 -> 50.

    Raises:
        VlampError: On anything else.
    """
    # YAML (and so a command-line override) reads a bare ``off`` as false.
    if spec is None or spec is False or spec == 0 or (
            isinstance(spec, str) and spec.strip().lower() in ("off", "", "false", "none", "0")):
        return 0
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return spec
    text = str(spec).strip().lower()
    if text.startswith("every:") and text[6:].isdigit() and int(text[6:]) > 0:
        return int(text[6:])
    raise VlampError(f"{what} must be 'off' or 'every:N' (N >= 1, e.g. every:50), got {spec!r}")


class _Accumulator:
    """Counts of one module's tensors on one step, on the device: [n, nonfinite, tiny, peak],
    judged against ``dtype``'s range (``peak``: the largest magnitude, inf/NaN included)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.parts: list[torch.Tensor] = []
        self.dtype = dtype

    def add(self, t: torch.Tensor) -> None:
        # Few passes over the tensor (the cost of a sampled step): the extremes, and the values
        # below the smallest normal; inf/NaN are counted only where the extremes hold one (a host
        # branch on the CPU, where reading a value costs nothing; on a GPU they are always counted
        # rather than wait for the device). count_nonzero, not a boolean sum: 27x faster on a CPU.
        t = t.detach()
        tiny = torch.finfo(self.dtype).tiny
        lo, hi = torch.aminmax(t)
        peak = torch.maximum(-lo, hi).float()
        if t.device.type == "cpu" and bool(torch.isfinite(peak)):
            nonfinite = torch.zeros((), device=t.device)
        else:
            nonfinite = torch.count_nonzero(~torch.isfinite(t)).float()
        self.parts.append(torch.stack([
            torch.tensor(float(t.numel()), device=t.device), nonfinite,
            torch.count_nonzero(t.abs() < tiny).float(), peak]))

    def read(self, parts: list[float]) -> dict[str, float]:
        n, nonfinite, low, amax = parts
        largest = torch.finfo(self.dtype).max
        if nonfinite or not amax < math.inf:
            headroom = 0.0  # overflowed: no room left
        else:
            headroom = math.log2(largest / amax) if amax > 0 else None
        return {"overflow": nonfinite / max(n, 1), "underflow": low / max(n, 1),
                "headroom_bits": headroom}


class Diagnostics:
    """Per-module overflow, underflow, headroom and lost updates on every ``every``-th step.

    Args:
        every: Sample one step in this many (the first step counts as step 1; step N is sampled when
            N % every == 0, and always step 1).
    """

    def __init__(self, every: int) -> None:
        self.every = parse_every(every)
        self.names: dict[int, str] = {}  # id(parameter) -> module name
        self.armed = False
        self.step = 0
        self._acts: dict[str, _Accumulator] = {}
        self._grads: dict[str, _Accumulator] = {}
        self._before: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._lost: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def attach(self, model: nn.Module, param_names: Mapping[int, str] | None = None) -> None:
        """Watches every module of ``model`` that holds parameters of its own or computes in
        another dtype than its parent (a plan boundary).

        Args:
            param_names: ``id(tensor) -> parameter name`` for tensors the optimizer updates in the
                model's stead (FP32 masters), so their lost updates are charged to the module.
        """
        for name, module in model.named_modules():
            own = any(True for _ in module.parameters(recurse=False))
            bounded = hasattr(module, "_vlamp_boundary")
            if not (own or bounded):
                continue
            self._handles.append(module.register_forward_hook(self._forward_hook(name or ROOT)))
        for pname, p in model.named_parameters():
            self.names[id(p)] = pname.rpartition(".")[0] or ROOT
        for pid, pname in (param_names or {}).items():
            self.names[pid] = pname.rpartition(".")[0] or ROOT

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.armed:
                return

            def watch(t: torch.Tensor) -> torch.Tensor:
                if t.is_floating_point():
                    self._acts.setdefault(name, _Accumulator(t.dtype)).add(t)
                    if t.requires_grad:
                        grads = self._grads.setdefault(name, _Accumulator(t.dtype))
                        t.register_hook(grads.add)
                return t

            map_tensors(output, watch)
        return hook

    # -- a step ----------------------------------------------------------------------------------
    def sampled(self, step: int) -> bool:
        return self.every > 0 and (step == 1 or step % self.every == 0)

    def begin(self, step: int) -> None:
        """Call before the step's first forward pass (``step`` counts from 1)."""
        self.step = step
        self.armed = self.sampled(step)
        self._acts, self._grads, self._lost, self._before = {}, {}, {}, []

    @torch.no_grad()
    def before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Call after the gradients are final (unscaled), before ``optimizer.step()``."""
        if not self.armed:
            return
        self.armed = False  # the forward/backward part of the step is over
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._before.append((self.names.get(id(p), "?"), p, p.detach().clone(),
                                         p.grad.detach() != 0))

    @torch.no_grad()
    def after_update(self, optimizer: torch.optim.Optimizer, applied: bool = True) -> None:
        """Call after ``optimizer.step()``; ``applied=False`` for a skipped step (nothing is
        counted as lost)."""
        del optimizer
        if applied:
            for name, p, before, had_grad in self._before:
                stuck = (p.detach() == before) & had_grad
                self._lost.setdefault(name, []).append(torch.stack([had_grad.sum().float(),
                                                                    stuck.sum().float()]))
        self._before = []

    def end(self, loss_scale: float = 1.0) -> dict[str, Any] | None:
        """The step's record (``None`` when the step was not sampled): per module the activation
        and gradient statistics and the lost-update fraction (``modules``), the dtype each module
        was judged in (``dtypes``), and the loss scale. One read of the device."""
        self.armed = False
        if not (self._acts or self._grads or self._lost):
            return None
        keys, parts, accs = [], [], []
        for kind, table in (("act", self._acts), ("grad", self._grads)):
            for name, acc in table.items():
                if acc.parts:
                    stacked = torch.stack([p.to(acc.parts[0].device) for p in acc.parts])
                    keys.append((kind, name))
                    accs.append(acc)
                    parts.append(torch.stack([stacked[:, 0].sum(), stacked[:, 1].sum(),
                                              stacked[:, 2].sum(), stacked[:, 3].max()]).cpu())
        for name, items in self._lost.items():
            keys.append(("lost", name))
            summed = torch.stack([i.cpu() for i in items]).sum(0)
            parts.append(torch.cat([summed, torch.zeros(2)]))
        values = torch.stack(parts).tolist() if parts else []
        modules: dict[str, dict[str, float]] = {}
        for i, ((kind, name), v) in enumerate(zip(keys, values)):
            row = modules.setdefault(name, {})
            if kind == "lost":
                row["lost_updates"] = v[1] / v[0] if v[0] else 0.0
                continue
            for stat, value in accs[i].read(v).items():
                row[f"{kind}_{stat}"] = value
        dtypes = {name: dtype_name(acc.dtype) for table in (self._acts, self._grads)
                  for name, acc in table.items()}
        self._acts, self._grads, self._lost = {}, {}, {}
        return {"step": self.step, "loss_scale": loss_scale, "modules": modules, "dtypes": dtypes}

