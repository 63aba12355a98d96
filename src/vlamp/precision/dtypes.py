"""One table from precision names to torch dtypes, and the one place that rejects a bad name."""

from __future__ import annotations

import torch

from vlamp.precision.errors import VlampError

# Canonical short name -> dtype. Aliases below all resolve to one of these.
CANONICAL: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

ALIASES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "f32": "fp32", "float": "fp32", "32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16", "16": "fp16",
}

LOW_PRECISION = (torch.bfloat16, torch.float16)


def to_dtype(name: str | torch.dtype, *, what: str = "dtype") -> torch.dtype:
    """Resolves a precision name (or a dtype) to a torch dtype.

    Args:
        name: One of the names in ``ALIASES`` (case-insensitive) or a supported torch dtype.
        what: The argument's name, used in the error message.

    Returns:
        The torch dtype.

    Raises:
        VlampError: If the name is not known; the message lists the legal names.

    Example:
        >>> to_dtype("bfloat16")
        torch.bfloat16
    """
    if isinstance(name, torch.dtype):
        if name in CANONICAL.values():
            return name
        raise VlampError(f"{what}: unsupported dtype {name}; legal: {legal_names()}")
    key = str(name).strip().lower()
    key = key.removeprefix("torch.")
    if key not in ALIASES:
        raise VlampError(f"{what}: unknown precision {name!r}; legal: {legal_names()}")
    return CANONICAL[ALIASES[key]]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical short name of a dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    for short, dt in CANONICAL.items():
        if dt == dtype:
            return short
    return str(dtype).removeprefix("torch.")


def legal_names() -> str:
    return ", ".join(sorted(ALIASES))
