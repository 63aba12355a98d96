"""TinyVLA: the default policy. A FiLM-conditioned CNN sees the image, a small transformer reads the
instruction, a transformer trunk mixes image, words and proprioception, and a head predicts a chunk
of future actions, either with learned queries and an L1 loss (ACT) or by flow matching (pi0).

The precision-fragile parts are separate modules with names the built-in precision rules know
(``*pos_embed*``, ``*time_embed*``, ``*time_sampler*``, ``*action_out*``, ``*loss*``, norms), so a
:class:`~vlamp.precision.PrecisionPlan` keeps them in FP32 without a single cast in this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlamp.models.config import ModelConfig, example_batch
from vlamp.precision.errors import VlampError


class PositionalEmbedding(nn.Module):
    """A learned embedding added to a (B, T, D) sequence."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, length, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[:, : x.shape[1]]


class Attention(nn.Module):
    """Scaled dot-product attention over (B, heads, T, d) queries, keys and values, with an optional
    boolean key mask (B, T). A module of its own, not a call inside :class:`Block`, so a precision
    rule can decide its compute dtype: attention is the op whose low-precision kernel is slow on
    some hardware (bf16 on CPU, measured by ``vlamp plan --auto``)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Block(nn.Module):
    """Pre-norm transformer layer (self-attention with an optional key mask, then a GELU MLP)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention = Attention()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, T) -> per-token features (B, T, D) and a pooled sentence vector (B, D)."""

    def __init__(self, vocab_size: int, length: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos_embed = PositionalEmbedding(length, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = tokens != 0
        x = self.pos_embed(self.token_embed(tokens))
        for layer in self.layers:
            x = layer(x, keep)
        x = self.norm(x)
        w = keep.unsqueeze(-1).to(x.dtype)
        return x, (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class FiLM(nn.Module):
    """Feature-wise modulation by the instruction, zero-initialised so training starts unconditioned
    (RT-1's choice)."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.to_scale_shift = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class ConvStage(nn.Module):
    """Conv (stride 2) -> GroupNorm -> SiLU -> conv -> GroupNorm -> FiLM -> SiLU."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.film = FiLM(cond_dim, c_out)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.norm1(self.down(x)))
        return F.silu(self.film(self.norm2(self.conv(x)), cond))


class SpatialSoftmax(nn.Module):
    """A feature map (B, C, H, W) -> (B, 2C): per channel, the expected (x, y) in [-1, 1] under a
    softmax over its positions (Levine et al. 2016), with a learned temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(1))  # 1-d: FSDP2 shards no scalars

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weights = (x.flatten(2) / self.log_temperature.exp()).softmax(-1)  # (B, C, HW)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=weights.dtype),
                                torch.linspace(-1, 1, w, device=x.device, dtype=weights.dtype),
                                indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (HW, 2)
        return (weights @ grid).flatten(1)


class ImageEncoder(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> (B, H/2^s * W/2^s, D) tokens, conditioned on ``cond``
    (one more with ``keypoints``: the spatial-softmax positions of the second-to-last stage).

    Convolutions run channels-last (NHWC), weights and activations alike: oneDNN's NHWC kernels
    are the fast ones on CPUs and on GPUs' tensor cores (docs/measurements.md has the step
    times)."""

    def __init__(self, channels: list[int], cond_dim: int, dim: int, keypoints: bool = False) -> None:
        super().__init__()
        ins = [3, *channels[:-1]]
        self.stages = nn.ModuleList(ConvStage(i, o, cond_dim) for i, o in zip(ins, channels))
        self.proj = nn.Linear(channels[-1], dim)
        self.stages.to(memory_format=torch.channels_last)
        # The stage whose map the keypoints are read from: the second-to-last (finer than the last).
        self.keypoint_stage = max(len(channels) - 2, 0) if keypoints else None
        if keypoints:
            self.spatial_softmax = SpatialSoftmax()
            self.keypoint_proj = nn.Linear(2 * channels[self.keypoint_stage], dim)

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = ((image - 0.5) * 4.0).contiguous(memory_format=torch.channels_last)
        keypoints = None
        for i, stage in enumerate(self.stages):
            x = stage(x, cond)
            if i == self.keypoint_stage:
                keypoints = self.keypoint_proj(self.spatial_softmax(x))
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return tokens if keypoints is None else torch.cat([tokens, keypoints[:, None]], dim=1)


class SinusoidalTimeEmbedding(nn.Module):
    """Flow time t in [0, 1] (B,) -> (B, D) sines and cosines over log-spaced periods."""

    def __init__(self, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> None:
        super().__init__()
        fraction = torch.linspace(0.0, 1.0, dim // 2)
        period = min_period * (max_period / min_period) ** fraction
        self.register_buffer("freq", 2 * math.pi / period, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angle = t[:, None] * self.freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class TimeSampler(nn.Module):
    """Training noise and flow time: t = 0.001 + 0.999 * Beta(1.5, 1), which puts more steps near
    t = 1, the noisy end (pi0's schedule)."""

    def forward(self, actions: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b = actions.shape[0]
        # Beta(a, 1) by inverse CDF: u^(1/a), so a torch.Generator can drive it.
        u = torch.rand(b, generator=generator, device=actions.device, dtype=torch.float32)
        t = 0.001 + 0.999 * u.pow(1.0 / 1.5)
        noise = torch.randn(actions.shape, generator=generator, device=actions.device,
                            dtype=torch.float32)
        return t, noise


def masked_mean(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, H, A) error over the real (unpadded) steps that ``mask`` (B, H) marks."""
    w = mask.unsqueeze(-1).to(error.dtype)
    return (error * w).sum() / (w.sum() * error.shape[-1]).clamp(min=1.0)


class ChunkL1Loss(nn.Module):
    """Mean absolute error over the real (unpadded) steps of each action chunk."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean((pred - target).abs(), mask)


class FlowMSELoss(nn.Module):
    """Mean squared error of the predicted velocity over the real steps of each chunk."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean((pred - target).square(), mask)


class TinyVLA(nn.Module):
    """The default vision-language-action policy (about 1.9 M parameters with the defaults).

    Args:
        config: The model shape; ``config.vocab_size`` must be set (see :class:`WordTokenizer`).

    Training: ``loss = model(batch)`` with ``batch`` holding ``image`` (B,3,H,W) in [0, 1],
    ``state`` (B,S), ``tokens`` (B,T), ``actions`` (B,H,A) and ``action_mask`` (B,H).
    Acting: ``model.predict(image, state, tokens)`` -> (B,H,A), in the dataset's normalized units.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size < 3:
            raise VlampError(f"TinyVLA: vocab_size must be set from the tokenizer, "
                             f"got {config.vocab_size}")
        c, d = config, config.dim
        self.config = config
        self.text = TextEncoder(c.vocab_size, c.max_tokens, d, c.heads, c.text_layers)
        self.vision = ImageEncoder(c.channels, d, d, c.keypoints)
        self.state_proj = nn.Linear(c.state_dim, d)
        self.action_queries = nn.Parameter(torch.randn(c.chunk, d) * 0.02)
        if c.head == "flow":
            self.time_sampler = TimeSampler()
            self.time_embed = SinusoidalTimeEmbedding(d)
            self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            self.action_in = nn.Linear(c.action_dim, d)
            self.loss_fn: nn.Module = FlowMSELoss()
        else:
            self.loss_fn = ChunkL1Loss()
        self.pos_embed = PositionalEmbedding(self._sequence_length(), d)
        self.trunk = nn.ModuleList(Block(d, c.heads) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, c.action_dim)

    def example_batch(self, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random training batch of this model's shapes, on the model's device (for measuring a
        plan without a dataset: the kernels' speed depends on shapes, not values)."""
        return example_batch(self.config, batch_size, self.action_queries.device, seed)

    def _sequence_length(self) -> int:
        side = self.config.image_size // 2 ** len(self.config.channels)
        return side * side + int(self.config.keypoints) + self.config.max_tokens + 1 + self.config.chunk

    def _trunk(self, image: torch.Tensor, state: torch.Tensor, tokens: torch.Tensor,
               queries: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) != (self.config.image_size,) * 2 or \
                tokens.shape[1] != self.config.max_tokens:
            raise VlampError(f"TinyVLA: built for {self.config.image_size}px images and "
                             f"{self.config.max_tokens} tokens, got {tuple(image.shape[-2:])} and "
                             f"{tokens.shape[1]}")
        words, sentence = self.text(tokens)
        pixels = self.vision(image, sentence)
        x = torch.cat([pixels, words, self.state_proj(state)[:, None], queries], dim=1)
        b, n_pix = x.shape[0], pixels.shape[1]
        keep = torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)
        keep[:, n_pix: n_pix + tokens.shape[1]] = tokens != 0
        x = self.pos_embed(x)
        for block in self.trunk:
            x = block(x, keep)
        return self.norm(x[:, -self.config.chunk:])

    def _flow_queries(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.action_in(x_t) + self.time_mlp(self.time_embed(t))[:, None] + self.action_queries

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch (a scalar, FP32 under the built-in rules)."""
        image, state, tokens = batch["image"], batch["state"], batch["tokens"]
        actions, mask = batch["actions"], batch["action_mask"]
        if self.config.head == "act":
            queries = self.action_queries.expand(image.shape[0], -1, -1)
            return self.loss_fn(self.action_out(self._trunk(image, state, tokens, queries)),
                                actions, mask)
        t, noise = self.time_sampler(actions)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        v = self.action_out(self._trunk(image, state, tokens, self._flow_queries(x_t, t)))
        return self.loss_fn(v, noise - actions, mask)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, state: torch.Tensor, tokens: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunks (B, H, A) in normalized units; the flow head integrates from noise with
        ``flow_steps`` Euler steps."""
        b = image.shape[0]
        if self.config.head == "act":
            queries = self.action_queries.expand(b, -1, -1)
            return self.action_out(self._trunk(image, state, tokens, queries)).float()
        x = torch.randn(b, self.config.chunk, self.config.action_dim, generator=generator,
                        device=image.device)
        steps = self.config.flow_steps
        for k in range(steps):
            t = torch.full((b,), 1.0 - k / steps, device=image.device)
            v = self.action_out(self._trunk(image, state, tokens, self._flow_queries(x, t)))
            x = x - v.float() / steps
        return x

