"""Optimizer state in 8 bits: block-wise dynamic quantization (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization", arXiv 2110.02861).

A state tensor (AdamW's ``exp_avg``, ``exp_avg_sq``) is cut into blocks of ``BLOCK`` elements;
each block is divided by its largest magnitude (kept in FP32) and every value stored as the index
of the nearest of 256 code values. The code is the *dynamic* map: an exponent that shrinks the
fraction as it grows, so values near zero keep relative precision (a linear code would flush the
small second moments that Adam divides by). First moments use the signed map, second moments
(keys with ``sq``: ``exp_avg_sq``) the unsigned one, which spends the sign bit on precision.

1 byte per element plus 4 per block: 2.03 bytes per parameter for AdamW's two moments, against 8
in FP32 and 4 in BF16. The optimizer steps on FP32 copies of a bucket at a time
(:mod:`vlamp.precision.weight_update`), so its arithmetic is unchanged.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256  # elements per absmax block


@functools.cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted code values in [-1, 1] (signed) or [0, 1] (unsigned): for each of 7
    decades ``10^-6 .. 10^0``, the midpoints of an even split of [0.1, 1] scaled by the decade,
    twice as many per decade unsigned; plus 0 and 1."""
    values: list[float] = []
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + ([-m for m in means] if signed else [])
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _midpoints(signed: bool) -> torch.Tensor:
    m = dynamic_map(signed)
    return (m[:-1] + m[1:]) / 2


_SHIFT = 13  # a float's top 19 bits (sign, exponent, 10 of the mantissa) name its table cell


@functools.cache
def _table(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For every cell of floats sharing their top bits: the code of its smallest value (the
    number of midpoints below it); and the midpoints with +inf appended. No cell holds more than
    one midpoint (checked here), so a value's code is its cell's plus one if it lies above the
    next midpoint: :func:`torch.bucketize`'s answer from two lookups and a comparison."""
    mids = _midpoints(signed)
    start = (torch.arange(1 << (32 - _SHIFT), dtype=torch.int64) << _SHIFT).to(torch.int32)
    ends = (start.view(torch.float32), (start | ((1 << _SHIFT) - 1)).view(torch.float32))
    lo, hi = torch.minimum(*ends), torch.maximum(*ends)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    code_lo = torch.bucketize(lo, mids, out_int32=True).where(finite, 0)
    spread = torch.bucketize(hi, mids, out_int32=True).where(finite, 0) - code_lo
    assert int(spread.max()) <= 1, "a table cell holds two midpoints: keep more mantissa bits"
    return code_lo, torch.cat([mids, mids.new_tensor([float("inf")])])


@functools.cache
def _on(device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_table`'s two tensors and :func:`dynamic_map` on ``device``, copied there once (a
    step on a GPU would otherwise copy them for every parameter)."""
    return (*(t.to(device) for t in _table(signed)), dynamic_map(signed).to(device))


def _codes(scaled: torch.Tensor, signed: bool) -> torch.Tensor:
    """``torch.bucketize(scaled, midpoints)`` (int32), about 3x faster: through :func:`_table`."""
    table, mids, _ = _on(scaled.device, signed)
    flat = scaled.reshape(-1)
    cell = (flat.view(torch.int32) >> _SHIFT).bitwise_and_((1 << (32 - _SHIFT)) - 1)
    code = torch.index_select(table, 0, cell)  # index_select: faster than indexing on a CPU
    del cell
    return code.add_(flat > torch.index_select(mids, 0, code)).view(scaled.shape)


def quantize(x: torch.Tensor, signed: bool,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape, FP32) -> (uint8 codes of ``x.numel()`` padded to whole blocks, FP32
    absmax per block). Each value maps to the nearest code value of its block's scale.

    ``out``: codes and absmax of the right sizes to write into (a step re-encodes every moment:
    writing into the buffers it already has keeps the long-lived state where it is, instead of
    re-allocating it between the step's temporaries, which fragments the heap)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, BLOCK)
    absmax = torch.amax(blocks.abs(), dim=1, out=out[1] if out is not None else None)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    index = _codes(scaled, signed)
    del scaled
    codes = out[0] if out is not None else torch.empty(flat.numel(), dtype=torch.uint8,
                                                       device=x.device)
    codes.copy_(index.view(-1))
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, like: torch.Tensor
               ) -> torch.Tensor:
    """The FP32 tensor of ``like``'s shape that :func:`quantize` encoded."""
    values = torch.index_select(_on(codes.device, signed)[2], 0, codes.int()).view(-1, BLOCK)
    values.mul_(absmax.unsqueeze(1))
    out = values.view(-1)[: like.numel()]
    return out.view(like.shape).contiguous(memory_format=_format(like))


def _format(like: torch.Tensor) -> torch.memory_format:
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) \
            and not like.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def is_signed(key: str) -> bool:
    """Second moments (``exp_avg_sq``, ``square_avg``) are never negative: the unsigned map."""
    return "sq" not in key


__all__ = ["BLOCK", "dequantize", "dynamic_map", "is_signed", "quantize"]
