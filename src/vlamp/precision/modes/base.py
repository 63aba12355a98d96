"""The interface every precision mode implements; its hooks do what FP32 needs, which is nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vlamp.precision.policy import FP32, Policy
from vlamp.precision.scaler import LossScaler, NoLossScaler


class Mode:
    """A named, complete precision recipe.

    A mode fixes the default :class:`Policy` of a model, the autocast context its forward runs in,
    whether a loss scaler is needed, and how the optimizer keeps weights. Subclasses override only
    what differs from FP32. The string -> mode mapping lives in :func:`vlamp.precision.modes.get_mode`.

    Attributes:
        name: The mode's name, e.g. ``"bf16-mixed"``.
        compute_dtype: The dtype most operations run in.
        master_weights: Whether parameters stored in low precision get FP32 master copies that the
            optimizer updates (so updates smaller than the storage format's resolution survive).
        default_update: The update method ``update="auto"`` means in this mode (see
            :class:`~vlamp.precision.weight_update.UpdateSettings`).
    """

    name = "fp32"
    compute_dtype: torch.dtype = torch.float32
    master_weights = True
    default_update = "master"

    @property
    def default_policy(self) -> Policy:
        """The policy of every module no rule decides."""
        return FP32

    @property
    def needs_scaler(self) -> bool:
        """Whether gradients underflow without loss scaling (FP16 compute)."""
        return False

    def default_scaler(self) -> LossScaler:
        """The scaler used when the user names none."""
        return NoLossScaler()

    @contextlib.contextmanager
    def autocast(self, device_type: str) -> Iterator[None]:
        """The context a forward pass runs in; FP32 needs none."""
        del device_type
        yield

    def optimizer_state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the optimizer state kept for a parameter stored in ``param_dtype``."""
        if self.master_weights and param_dtype != torch.float32:
            return torch.float32
        return param_dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FP32Mode(Mode):
    """Everything in FP32: the reference every other mode is measured against."""
