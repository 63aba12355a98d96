"""Which model ``model.name`` builds."""

from __future__ import annotations

from torch import nn

from vlamp.models.config import ModelConfig
from vlamp.models.tinyvla import TinyVLA


def build_model(config: ModelConfig) -> nn.Module:
    """The policy ``config.name`` names: :class:`TinyVLA` or the transformers-backed
    :class:`~vlamp.models.hf_vla.HFVLA`."""
    if config.name == "hf-vlm":
        from vlamp.models.hf_vla import HFVLA

        return HFVLA(config)
    return TinyVLA(config)
