"""Precision modes. :func:`get_mode` is the only place a mode name becomes a mode."""

from __future__ import annotations

import torch

from vlamp.precision.errors import VlampError
from vlamp.precision.modes.base import FP32Mode, Mode
from vlamp.precision.modes.mixed import MixedMode
from vlamp.precision.modes.storage import StorageMode
from vlamp.precision.modes.true import TrueMode

MODE_NAMES = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true", "fp16-true", "bf16-storage")


def get_mode(name: str | Mode, device: str | torch.device | None = None) -> Mode:
    """Returns the mode called ``name``; ``"auto"`` picks one from the hardware.

    Args:
        name: One of ``MODE_NAMES`` or ``"auto"`` (or a ``Mode``, returned as is).
        device: For ``"auto"``: the device to decide for (default: CUDA if available, else CPU).

    Raises:
        VlampError: If the name is unknown; the message lists the legal names.
    """
    if isinstance(name, Mode):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        from vlamp.precision.hardware import choose_mode, detect

        return get_mode(choose_mode(detect(device)).mode)
    table = {
        "fp32": FP32Mode,
        "bf16-mixed": lambda: MixedMode(torch.bfloat16),
        "fp16-mixed": lambda: MixedMode(torch.float16),
        "bf16-true": lambda: TrueMode(torch.bfloat16),
        "fp16-true": lambda: TrueMode(torch.float16),
        "bf16-storage": StorageMode,
    }
    if key not in table:
        raise VlampError(f"mode: unknown mode {name!r}; legal: {', '.join(MODE_NAMES)}, auto")
    return table[key]()


__all__ = ["MODE_NAMES", "FP32Mode", "MixedMode", "Mode", "StorageMode", "TrueMode", "get_mode"]
