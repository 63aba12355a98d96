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


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape, FP32) -> (uint8 codes of ``x.numel()`` padded to whole blocks, FP32
    absmax per block). Each value maps to the nearest code value of its block's scale."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(scaled, _midpoints(signed).to(x.device))
    return codes.to(torch.uint8).view(-1), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, like: torch.Tensor
               ) -> torch.Tensor:
    """The FP32 tensor of ``like``'s shape that :func:`quantize` encoded."""
    values = dynamic_map(signed).to(codes.device)[codes.long()].view(-1, BLOCK)
    out = (values * absmax.unsqueeze(1)).view(-1)[: like.numel()]
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
