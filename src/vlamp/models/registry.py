"""Which model ``model.name`` builds, and the layer stacks a memory probe shrinks."""

from __future__ import annotations

import dataclasses

from torch import nn

from vlamp.models.config import ModelConfig
from vlamp.models.presets import VLA_PRESETS
from vlamp.models.tinyvla import TinyVLA

# The repeated blocks of every model vlamp builds: what ``train.checkpoint`` names to recompute
# them all (TinyVLA's transformer blocks; SigLIP's and Gemma's layers in hf-vlm).
BLOCKS = ("Block", "SiglipEncoderLayer", "GemmaDecoderLayer")


def build_model(config: ModelConfig, depths: dict[str, int] | None = None) -> nn.Module:
    """The policy ``config.name`` names: :class:`TinyVLA` or the transformers-backed
    :class:`~vlamp.models.hf_vla.HFVLA`.

    Args:
        config: The model config.
        depths: Layers per stack (keys of :func:`stack_depths`) instead of the config's: the
            shallow copies a memory probe measures (:mod:`vlamp.train.fit`).
    """
    depths = depths or {}
    if config.name == "hf-vlm":
        from vlamp.models.hf_vla import HFVLA

        if config.size in VLA_PRESETS:
            return HFVLA(config, layers=depths)
        if depths:
            config = dataclasses.replace(config, depth=depths.get("text", config.depth),
                                         text_layers=depths.get("vision", config.text_layers))
        return HFVLA(config)
    if depths:
        config = dataclasses.replace(config, depth=depths.get("trunk", config.depth),
                                     text_layers=depths.get("text", config.text_layers))
    return TinyVLA(config)


def stack_depths(config: ModelConfig) -> dict[str, int]:
    """The model's stacks of identical layers and how deep each is (``{}`` for a backbone read
    from a user's ``config.json``: it is probed whole)."""
    if config.name == "hf-vlm":
        if config.size in VLA_PRESETS:
            p = VLA_PRESETS[config.size]
            return {"vision": p["vision"]["num_hidden_layers"], "text": p["text"]["num_hidden_layers"],
                    "expert": p["expert"]["num_hidden_layers"]}
        return {} if config.hf_config else {"vision": config.text_layers, "text": config.depth}
    return {"text": config.text_layers, "trunk": config.depth}
