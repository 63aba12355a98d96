"""Number formats: bit layout and the limits that matter for training.

Values come from ``torch.finfo`` where torch has the dtype; TF32 (a tensor-core compute format with no
torch dtype) is derived from its bit layout with the same IEEE-754 formulas.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Format:
    """One floating-point number format.

    Attributes:
        name: Short name, e.g. ``"bf16"``.
        dtype: The torch dtype, or ``None`` for formats torch cannot store (TF32).
        exponent_bits: Width of the exponent field.
        mantissa_bits: Stored fraction bits (the implicit leading bit not counted).
        max_normal: Largest finite value.
        min_normal: Smallest positive normal value.
        min_subnormal: Smallest positive subnormal value; below it values flush to zero.
        epsilon: Gap between 1 and the next representable value.
    """

    name: str
    dtype: torch.dtype | None
    exponent_bits: int
    mantissa_bits: int
    max_normal: float
    min_normal: float
    min_subnormal: float
    epsilon: float

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return d


def _from_finfo(name: str, dtype: torch.dtype, exponent_bits: int, mantissa_bits: int) -> Format:
    fi = torch.finfo(dtype)
    return Format(
        name=name,
        dtype=dtype,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max_normal=float(fi.max),
        min_normal=float(fi.smallest_normal),
        min_subnormal=float(fi.smallest_normal) * float(fi.eps),
        epsilon=float(fi.eps),
    )


def _ieee(name: str, exponent_bits: int, mantissa_bits: int) -> Format:
    bias = 2 ** (exponent_bits - 1) - 1
    return Format(
        name=name,
        dtype=None,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max_normal=(2 - 2.0**-mantissa_bits) * 2.0**bias,
        min_normal=2.0 ** (1 - bias),
        min_subnormal=2.0 ** (1 - bias - mantissa_bits),
        epsilon=2.0**-mantissa_bits,
    )


FORMATS: dict[str, Format] = {
    "fp32": _from_finfo("fp32", torch.float32, 8, 23),
    "tf32": _ieee("tf32", 8, 10),
    "fp16": _from_finfo("fp16", torch.float16, 5, 10),
    "bf16": _from_finfo("bf16", torch.bfloat16, 8, 7),
    "fp8-e4m3": _from_finfo("fp8-e4m3", torch.float8_e4m3fn, 4, 3),
    "fp8-e5m2": _from_finfo("fp8-e5m2", torch.float8_e5m2, 5, 2),
}


def format_table() -> str:
    """The format table as aligned text, one row per format."""
    head = f"{'format':<9} {'exp':>3} {'man':>3} {'max normal':>11} {'min normal':>11} " \
           f"{'min subnorm':>11} {'epsilon':>10}"
    rows = [head]
    for f in FORMATS.values():
        rows.append(
            f"{f.name:<9} {f.exponent_bits:>3} {f.mantissa_bits:>3} {f.max_normal:>11.4g} "
            f"{f.min_normal:>11.4g} {f.min_subnormal:>11.4g} {f.epsilon:>10.4g}"
        )
    return "\n".join(rows)
