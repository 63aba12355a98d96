"""FP32 islands save their inputs for the backward in the low precision they arrived in.

An FP32 island (a norm, the action output) casts its BF16/FP16 inputs up to FP32, and the ops inside
save those FP32 copies for the backward: twice the bytes of what arrived. The upcast is exact, so
saving the low-precision original and casting it up again when the backward unpacks it gives the
same bits. :func:`saving_low_precision` does that with autograd's saved-tensor hooks around the
island's forward, for exactly the tensors the boundary cast, and only while they are unchanged (an
in-place op on an input bumps its version, and then the FP32 tensor is saved as it is).

Hooks already active outside (an :class:`~vlamp.precision.memory.ActivationMeter`, activation
checkpointing) still see every saved tensor: this one hands what it saves on to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlamp.precision.dtypes import LOW_PRECISION


class _Low:
    """A saved FP32 tensor kept as the low-precision tensor it was cast from (and, for a view of
    the FP32 copy, such as a weight's transpose, the view's geometry)."""

    __slots__ = ("dtype", "packed", "view")

    def __init__(self, packed: Any, dtype: torch.dtype,
                 view: tuple[torch.Size, tuple[int, ...], int] | None = None) -> None:
        self.packed, self.dtype, self.view = packed, dtype, view


class _Outer:
    """What the hooks outside packed, kept apart from values the op saved itself."""

    __slots__ = ("packed",)

    def __init__(self, packed: Any) -> None:
        self.packed = packed


class Upcasts:
    """The FP32 copies a boundary made of low-precision inputs, and their originals."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        up = t.to(dtype)
        if dtype == torch.float32 and t.dtype in LOW_PRECISION:
            self.by_id[id(up)] = (up, t, up._version)
        return up

    def clear(self) -> None:
        """Forgets the copies (call when the forward that made them ends: what the ops saved
        holds its own references)."""
        self.by_id.clear()

    def original(self, t: torch.Tensor) -> torch.Tensor | None:
        entry = self.by_id.get(id(t))
        if entry is None or entry[0] is not t or t._version != entry[2]:
            return None
        return entry[1]

    def original_of_view(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple] | None:
        """For a view of an FP32 copy (``up.t()``, as a linear layer saves its weight): the
        low-precision original, and the view's size, stride and offset, when the original's
        upcast has the copy's layout (so the view can be taken again)."""
        base = t._base
        if base is None:
            return None
        low = self.original(base)
        if low is None or low.stride() != base.stride():
            return None
        return low, (t.size(), t.stride(), t.storage_offset())


@contextlib.contextmanager
def saving_low_precision(upcasts: Upcasts) -> Iterator[None]:
    """Saved-tensor hooks that keep ``upcasts``' FP32 copies as their low-precision originals."""
    if not upcasts.by_id or not torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        yield
        return
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(t: torch.Tensor) -> Any:
        low, view = upcasts.original(t), None
        if low is None:
            low, view = upcasts.original_of_view(t) or (None, None)
        if low is not None:
            return _Low(outer_pack(low) if outer_pack else low, t.dtype, view)
        return _Outer(outer_pack(t)) if outer_pack else t

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Low):
            low = outer_unpack(packed.packed) if outer_unpack else packed.packed
            up = low.to(packed.dtype)
            return up if packed.view is None else up.as_strided(*packed.view)
        if isinstance(packed, _Outer):
            return outer_unpack(packed.packed)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
