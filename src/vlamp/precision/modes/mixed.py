"""``bf16-mixed`` and ``fp16-mixed``: FP32 parameters, low-precision compute under autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vlamp.precision.dtypes import dtype_name
from vlamp.precision.modes.base import Mode
from vlamp.precision.policy import Policy
from vlamp.precision.scaler import DynamicLossScaler, LossScaler, NoLossScaler


class MixedMode(Mode):
    """Parameters, gradients and optimizer state stay FP32; matmuls and convolutions run in
    ``compute_dtype`` through ``torch.autocast`` (which itself keeps reductions such as softmax and
    norms in FP32). FP16 compute gets a dynamic loss scaler by default; BF16 has FP32's range and
    needs none.

    Args:
        compute_dtype: ``torch.bfloat16`` or ``torch.float16``.
    """

    def __init__(self, compute_dtype: torch.dtype) -> None:
        if compute_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"{type(self).__name__}: compute_dtype must be bf16 or fp16")
        self.compute_dtype = compute_dtype
        self.name = f"{dtype_name(compute_dtype)}-mixed"

    @property
    def default_policy(self) -> Policy:
        return Policy(torch.float32, self.compute_dtype, self.compute_dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.compute_dtype == torch.float16

    def default_scaler(self) -> LossScaler:
        return DynamicLossScaler() if self.needs_scaler else NoLossScaler()

    @contextlib.contextmanager
    def autocast(self, device_type: str) -> Iterator[None]:
        with torch.autocast(device_type=device_type, dtype=self.compute_dtype):
            yield
