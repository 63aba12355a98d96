"""The describe table: what precision every module of a model is stored, computed and updated in."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vlamp.precision.dtypes import dtype_name
from vlamp.precision.modes import Mode
from vlamp.precision.plan import PrecisionPlan, Resolved
from vlamp.precision.state8 import BLOCK

COLUMNS = ("module", "class", "params", "compute", "output", "grad", "optim", "#params", "B/param",
           "rule", "measured")


@dataclasses.dataclass
class Row:
    """One module (or a folded subtree). ``num_params`` counts the module's own parameters plus
    those of folded descendants. Dtype cells read like ``bf16`` or ``bf16+fp32`` when a folded
    subtree holds several; ``-`` where there are no parameters. ``measured`` is, for a measured plan,
    the module's forward+backward time in FP32 and in low precision (summed over a folded subtree).
    ``bytes_per_param`` is what training holds per parameter between steps, plus one micro-batch's
    gradient: weight, FP32 master or compensation buffer, gradient and optimizer state (see
    :func:`bytes_per_param`)."""

    module: str
    cls: str
    params: str
    compute: str
    output: str
    grad: str
    optim: str
    num_params: int
    bytes_per_param: float
    rule: str
    depth: int
    measured: str = ""

    def cells(self) -> list[str]:
        per = f"{self.bytes_per_param:.3g}" if self.num_params else "-"
        return [self.module, self.cls, self.params, self.compute, self.output, self.grad,
                self.optim, f"{self.num_params:,}", per, self.rule, self.measured]


@dataclasses.dataclass
class PlanTable:
    """Rows of a resolved plan; ``str(table)`` renders aligned text, ``to_dicts()`` plain data.
    ``notes`` are lines printed under the table (the device, TF32)."""

    mode: str
    rows: list[Row]
    notes: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, resolved: Sequence[Resolved], mode: Mode, max_depth: int | None = None,
              timings: Mapping[str, Mapping[str, Any]] | None = None,
              uncalled: Mapping[str, str] | None = None, update: str = "master",
              moments: int = 2, state8: bool = False) -> PlanTable:
        timings, uncalled = timings or {}, uncalled or {}
        rows: list[Row] = []
        groups: list[list[Resolved]] = []
        for r in resolved:
            depth = 0 if not r.name else r.name.count(".") + 1
            if max_depth is None or depth <= max_depth:
                groups.append([r])
            else:
                groups[-1].append(r)  # named_modules is depth-first: the last kept row is an ancestor
        for group in groups:
            head = group[0]
            owned = [(r, sum(p.numel() for p in r.module.parameters(recurse=False))) for r in group]
            with_params = [r for r, n in owned if n]

            def cell(values: list[str]) -> str:
                return "+".join(dict.fromkeys(values)) or "-"

            # frozen: no gradient, no optimizer state; the weight alone
            frozen = {id(r) for r in with_params
                      if not any(p.requires_grad for p in r.module.parameters(recurse=False))}
            held = sum(n * (torch.empty((), dtype=r.policy.param).element_size() if id(r) in frozen
                            else bytes_per_param(r.policy.param, mode, update, moments, state8))
                       for r, n in owned)
            count = sum(n for _, n in owned)
            rows.append(Row(
                module=head.name or "(root)",
                cls=type(head.module).__name__,
                params=cell([dtype_name(r.policy.param) for r in with_params]),
                compute=cell(["fp32 (itself)" if r.itself else dtype_name(r.policy.compute)
                              for r in group]),
                output=cell(["as returned" if r.itself and r.policy == r.parent_policy
                             else dtype_name(r.policy.output) for r in group]),
                grad=cell(["-" if id(r) in frozen else dtype_name(r.policy.param)
                           for r in with_params]),
                optim=cell(["frozen" if id(r) in frozen else "8bit" if state8
                            else dtype_name(_state_dtype(r.policy.param, mode, update))
                            for r in with_params]),
                num_params=count,
                bytes_per_param=held / count if count else 0.0,
                rule=head.decided_by + (" (never ran: storage only)" if head.name in uncalled else ""),
                depth=0 if not head.name else head.name.count(".") + 1,
                measured=_measured_cell([timings[r.name] for r in group if r.name in timings]),
            ))
        return cls(mode.name, rows)

    def to_dicts(self) -> list[dict[str, object]]:
        return [dict(zip(COLUMNS, (*r.cells()[:7], r.num_params, r.bytes_per_param, *r.cells()[9:])))
                for r in self.rows]

    def __str__(self) -> str:
        n = len(COLUMNS) if any(r.measured for r in self.rows) else len(COLUMNS) - 1
        body = [list(COLUMNS[:n])] + [r.cells()[:n] for r in self.rows]
        for cells, row in zip(body[1:], self.rows):
            cells[0] = "  " * row.depth + cells[0]
        widths = [max(len(c[i]) for c in body) for i in range(n)]
        lines = ["  ".join(c.ljust(w) if i not in (7, 8) else c.rjust(w)
                           for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
                 for cells in body]
        lines.insert(1, "-" * len(lines[0]))
        total = sum(r.num_params for r in self.rows)
        held = sum(r.num_params * r.bytes_per_param for r in self.rows)
        lines.append(f"mode {self.mode}: {total:,} parameters in {len(self.rows)} rows, "
                     f"{held / max(total, 1):.3g} bytes per parameter ({held / 2**20:.1f} MiB)")
        return "\n".join(lines + self.notes)


def describe_plan(plan: PrecisionPlan, model: nn.Module, max_depth: int | None = None,
                  uncalled: Mapping[str, str] | None = None, update: str = "auto",
                  moments: int = 2, state8: bool = False) -> PlanTable:
    """The per-module table of ``plan`` on ``model``: storage / compute / output / grad /
    optimizer-state dtype, parameter count and deciding rule. Rows below ``max_depth`` are folded
    into their ancestor.

    Args:
        plan: The plan (a measured plan adds each module's times).
        model: The model, set up by the plan or not.
        max_depth: Fold rows deeper than this into their ancestor.
        uncalled: Modules whose rule changed storage only (their forward never ran; see
            :meth:`MixedPrecision.describe`).
        update: The update method (see :mod:`vlamp.precision.update`); with ``moments``
            (optimizer-state tensors per parameter; AdamW 2) it decides the bytes per parameter.
        state8: The optimizer's moments are kept in 8 bits (``optimizer_state="8bit"``).

    Returns:
        A :class:`PlanTable`; ``str()`` renders it.
    """
    timings = (plan.measured or {}).get("modules", {})
    update = plan.mode.default_update if update == "auto" else update
    return PlanTable.build(plan.resolve(model, warn_unmatched=False), plan.mode, max_depth,
                           timings=timings, uncalled=uncalled, update=update, moments=moments,
                           state8=state8)


def bytes_per_param(param: torch.dtype, mode: Mode, update: str = "master", moments: int = 2,
                    state8: bool = False) -> float:
    """Bytes training holds for one parameter stored in ``param``: the weight, its FP32 master
    (``update="master"``) or compensation buffer (``"kahan"``), one gradient in the dtype the
    optimizer reads it in, and ``moments`` optimizer-state tensors (AdamW: 2), each of 1 byte
    plus its share of a block's FP32 scale with ``state8``. The sum of :func:`state_by_kind`."""
    return sum(state_by_kind(param, mode, update, moments, state8).values())


def state_by_kind(param: torch.dtype, mode: Mode, update: str = "master", moments: int = 2,
                  state8: bool = False) -> dict[str, float]:
    """:func:`bytes_per_param` by kind: ``weights``, ``masters``, ``compensation``, ``grads``,
    ``optimizer`` (bytes for one trained parameter stored in ``param``)."""
    size = torch.empty((), dtype=param).element_size()
    moment = 1 + 4 / BLOCK if state8 else None
    out = {"weights": float(size), "masters": 0.0, "compensation": 0.0, "grads": float(size),
           "optimizer": 0.0}
    if param == torch.float32 or (mode.master_weights and update == "master"):
        out["masters"] = 0.0 if param == torch.float32 else 4.0
        out["grads"] = 4.0  # FP32 masters read FP32 gradients
        out["optimizer"] = (moment or 4) * moments
    else:
        out["compensation"] = float(size) if update == "kahan" else 0.0
        out["optimizer"] = (moment or size) * moments
    return out


def _state_dtype(param: torch.dtype, mode: Mode, update: str) -> torch.dtype:
    return param if update != "master" else mode.optimizer_state_dtype(param)


def _measured_cell(entries: list[Mapping[str, Any]]) -> str:
    if not entries:
        return ""
    low = entries[0].get("dtype", "low")
    fp32 = sum(float(e["fp32_ms"]) for e in entries)
    lp = sum(float(e["low_ms"]) for e in entries)
    if len(entries) == 1:
        return f"fp32 {fp32:.2f} / {low} {lp:.2f} ms"
    chosen = sum(float(e["fp32_ms"] if e.get("kept_fp32") else e["low_ms"]) for e in entries)
    return f"fp32 {fp32:.2f} / {low} {lp:.2f} / plan {chosen:.2f} ms"


__all__ = ["COLUMNS", "PlanTable", "Row", "bytes_per_param", "describe_plan", "state_by_kind"]
