"""``bf16-true`` and ``fp16-true``: parameters stored in low precision, FP32 master weights."""

from __future__ import annotations

import torch

from vlamp.precision.dtypes import dtype_name
from vlamp.precision.modes.mixed import MixedMode
from vlamp.precision.policy import Policy


class TrueMode(MixedMode):
    """Parameters (and so gradients and activations) are stored in ``compute_dtype``, halving
    their memory. The optimizer updates FP32 master copies and the model gets them rounded back after
    every step, so updates smaller than the format's resolution (1/256 of a weight in BF16) are not
    lost; gradients of successive backward passes are accumulated into the masters in FP32.

    The forward still runs under autocast in ``compute_dtype``: it is a no-op for tensors already in
    that dtype and casts down the FP32 outputs of the plan's FP32 islands where they re-enter.
    """

    def __init__(self, compute_dtype: torch.dtype) -> None:
        super().__init__(compute_dtype)
        self.name = f"{dtype_name(compute_dtype)}-true"

    @property
    def default_policy(self) -> Policy:
        return Policy(self.compute_dtype, self.compute_dtype, self.compute_dtype)
