"""``bf16-storage``: weights stored in BF16, every operation computed in FP32."""

from __future__ import annotations

import torch

from vlamp.precision.dtypes import dtype_name
from vlamp.precision.modes.base import Mode
from vlamp.precision.policy import Policy


class StorageMode(Mode):
    """Parameters (and so gradients) are stored in ``storage_dtype``, halving their memory, while
    the forward and backward compute in FP32: each module's weights are cast up for its forward
    (:mod:`vlamp.precision.apply`), so the speed is FP32's on any CPU, native BF16 or not.

    Without FP32 masters the optimizer's moments are kept in the storage dtype too, so the
    default update (``update="auto"``) is stochastic rounding: 8 bytes per parameter of state
    with AdamW, against 16 in FP32 (Kahan: 10; masters, which would hold more than FP32: 18).

    Args:
        storage_dtype: ``torch.bfloat16``.
    """

    compute_dtype = torch.float32
    default_update = "stochastic"

    def __init__(self, storage_dtype: torch.dtype = torch.bfloat16) -> None:
        if storage_dtype != torch.bfloat16:
            raise ValueError(f"{type(self).__name__}: storage_dtype must be bf16")
        self.storage_dtype = storage_dtype
        self.name = f"{dtype_name(storage_dtype)}-storage"

    @property
    def default_policy(self) -> Policy:
        return Policy(self.storage_dtype, torch.float32, torch.float32)
