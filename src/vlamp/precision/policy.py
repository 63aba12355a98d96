"""A precision policy: the three dtypes that describe one module, and their string grammar."""

from __future__ import annotations

import dataclasses

import torch

from vlamp.precision.dtypes import dtype_name, to_dtype
from vlamp.precision.errors import VlampError

_KEYS = {"params": "param", "param": "param", "p": "param",
         "compute": "compute", "c": "compute",
         "output": "output", "o": "output"}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one module stores, computes and hands on its tensors.

    Attributes:
        param: Storage dtype of the module's own parameters (and so of their gradients).
        compute: The dtype the module's operations run in.
        output: The dtype of floating-point tensors that leave the module.

    Example:
        >>> Policy.parse("params=fp32,compute=bf16")
        Policy(param=fp32, compute=bf16, output=bf16)

    Raises:
        VlampError: On an unknown dtype, or weights stored in one low-precision dtype that would
            compute in another (``params=fp16,compute=bf16``). Low-precision storage computes in
            its own dtype, or in FP32 (``params=bf16,compute=fp32``: the weights are cast up for
            each forward).
    """

    param: torch.dtype = torch.float32
    compute: torch.dtype = torch.float32
    output: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for field in ("param", "compute", "output"):
            object.__setattr__(self, field, to_dtype(getattr(self, field), what=f"Policy.{field}"))
        if self.param != torch.float32 and self.compute not in (self.param, torch.float32):
            p, c = dtype_name(self.param), dtype_name(self.compute)
            raise VlampError(f"policy params={p},compute={c}: weights stored in {p} compute in {p} "
                             f"or, cast up for each forward, in fp32; use params={p},compute={p}, "
                             f"params={p},compute=fp32 or params=fp32,compute={c}")

    @classmethod
    def parse(cls, spec: str) -> Policy:
        """Parses ``params=fp32,compute=bf16,output=fp32`` (keys ``p``/``c``/``o`` also work).

        A missing ``compute`` falls back to ``params``, a missing ``output`` to ``compute``. A bare
        dtype name (``"bf16"``) means all three.

        Raises:
            VlampError: On an unknown key, an unknown dtype, a repeated key or an empty spec.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise VlampError("policy: empty spec; expected e.g. 'params=fp32,compute=bf16,output=fp32'")
        text = spec.strip()
        if "=" not in text:
            dt = to_dtype(text, what="policy")
            return cls(dt, dt, dt)
        got: dict[str, torch.dtype] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in _KEYS:
                raise VlampError(
                    f"policy {spec!r}: bad entry {part.strip()!r}; keys: params|p, compute|c, output|o"
                )
            field = _KEYS[key]
            if field in got:
                raise VlampError(f"policy {spec!r}: {field} given twice")
            got[field] = to_dtype(value, what=f"policy {key}")
        if "param" not in got:
            raise VlampError(f"policy {spec!r}: params=... is required")
        compute = got.get("compute", got["param"])
        return cls(got["param"], compute, got.get("output", compute))

    def __str__(self) -> str:
        return (f"params={dtype_name(self.param)},compute={dtype_name(self.compute)},"
                f"output={dtype_name(self.output)}")

    def __repr__(self) -> str:
        return (f"Policy(param={dtype_name(self.param)}, compute={dtype_name(self.compute)}, "
                f"output={dtype_name(self.output)})")


FP32 = Policy(torch.float32, torch.float32, torch.float32)
