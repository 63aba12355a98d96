"""A small VLA-shaped model for the precision tests (exact module boundaries to assert on): a conv image encoder with
GroupNorm, token embeddings with a positional embedding, a pre-norm transformer layer and an action
output projection, named so the built-in FP32 rules find their parts."""

from __future__ import annotations

import torch
from torch import nn

from vlamp.models.tinyvla import PositionalEmbedding


class DemoVLA(nn.Module):
    """Image (B,3,H,W) + token ids (B,T) -> actions (B, chunk, action_dim)."""

    def __init__(self, dim: int = 32, vocab: int = 16, tokens: int = 4, chunk: int = 4,
                 action_dim: int = 4) -> None:
        super().__init__()
        self.vision = nn.Sequential(
            nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.GroupNorm(4, dim), nn.SiLU(),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.token_embed = nn.Embedding(vocab, dim)
        self.pos_embed = PositionalEmbedding(tokens + 1, dim)
        self.trunk = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU())
        self.action_out = nn.Linear(dim, chunk * action_dim)
        self.chunk, self.action_dim = chunk, action_dim

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.vision(image)[:, None], self.token_embed(tokens)], dim=1)
        x = self.trunk(self.pos_embed(x))
        return self.action_out(self.head(x[:, 0])).view(-1, self.chunk, self.action_dim)

    @staticmethod
    def example_inputs(batch: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 16, (batch, 4), generator=g)
