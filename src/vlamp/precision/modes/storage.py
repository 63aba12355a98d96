"""``bf16-storage``: weights stored in BF16, every operation computed in FP32."""

from __future__ import annotations

import torch

from vlamp.precision.modes.base import Mode
from vlamp.precision.policy import Policy


class StorageMode(Mode):
    """Parameters (and so gradients) are stored in ``storage_dtype``, halving their memory, while
    the forward and backward compute in FP32: each module's weights are cast up for its forward
    (:mod:`vlamp.precision.apply`), so the speed is FP32's on any CPU, native BF16 or not.

    Without FP32 masters the optimizer's moments are kept in the storage dtype too, so the
    default update (``update="auto"``) is stochastic rounding: 8 bytes per parameter of state
    with AdamW, against 16 in FP32 (Kahan: 10; masters, which would hold more than FP32: 18).

    Stochastic rounding is for BF16, so this mode stores BF16 only (an FP16 storage mode would
    need Kahan or masters).
    """

    name = "bf16-storage"
    storage_dtype = torch.bfloat16
    compute_dtype = torch.float32
    default_update = "stochastic"

    @property
    def default_policy(self) -> Policy:
        return Policy(self.storage_dtype, torch.float32, torch.float32)
