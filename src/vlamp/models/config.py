"""The policy models' config and sizes: what every model is built from (see
:func:`vlamp.models.registry.build_model`), and a random batch of its shapes."""

from __future__ import annotations

import dataclasses

import torch

from vlamp.models.presets import VLA_PRESETS
from vlamp.precision.errors import VlampError

HEADS = ("act", "flow")

# Model sizes: ``model.size=NAME`` fills these keys unless they are given too. ``small`` is the
# CPU-sized default (1.9 M parameters). On a GPU it is launch-bound, so a precision's speed-up means
# nothing there; ``base`` (75 M parameters) and ``large`` (377 M) load one. Train them on images of
# 128 px or more (``vlamp data generate --image-size 128``).
SIZES: dict[str, dict[str, object]] = {
    "small": {"dim": 128, "depth": 4, "heads": 4, "text_layers": 2, "channels": [32, 64, 128, 128]},
    "base": {"dim": 640, "depth": 12, "heads": 10, "text_layers": 2, "channels": [64, 128, 256, 512]},
    "large": {"dim": 1024, "depth": 24, "heads": 16, "text_layers": 4,
              "channels": [128, 256, 512, 1024]},
}


# Keys added to ModelConfig since the first checkpoints, with the value that rebuilds the model those
# checkpoints hold (the default of a new run may differ).
SAVED_BEFORE: dict[str, object] = {"keypoints": False, "name": "tinyvla", "hf_config": "",
                                   "hf_pretrained": False}
MODEL_NAMES = ("tinyvla", "hf-vlm")


def saved_model_config(saved: dict[str, object]) -> dict[str, object]:
    """A ``model`` config section read from a checkpoint, completed with :data:`SAVED_BEFORE` for
    keys older checkpoints lack.

    Raises:
        VlampError: If it has keys this version does not know (written by a newer vlamp).
    """
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise VlampError(f"the checkpoint's model has settings this vlamp does not know "
                         f"({', '.join(unknown)}): it was written by a newer version; upgrade vlamp "
                         f"to load it")
    return {**SAVED_BEFORE, **saved}


def with_size(model: dict[str, object]) -> dict[str, object]:
    """A ``model`` config section with its ``size`` preset filled in under the keys it gives.

    Raises:
        VlampError: On an unknown size.
    """
    size = model.get("size")
    if size is None or size in VLA_PRESETS:  # a real-size preset's shapes are its own
        return model
    if size not in SIZES:
        raise VlampError(f"model.size must be one of {', '.join(size_names())}, got {size!r}")
    return {**SIZES[str(size)], **model}


def size_names() -> list[str]:
    """Every legal ``model.size``: TinyVLA's sizes, then hf-vlm's real-size presets."""
    return [*SIZES, *VLA_PRESETS]


@dataclasses.dataclass
class ModelConfig:
    """The policy model and its shape. ``vocab_size``, ``state_dim`` and ``action_dim`` come from
    the dataset.

    Attributes:
        name: ``tinyvla`` (the default policy) or ``hf-vlm`` (a VLA on a transformers VLM
            backbone, PaliGemma's architecture: SigLIP tower + Gemma decoder, sized by ``dim``,
            ``depth`` decoder layers, ``text_layers`` vision layers and ``heads``; needs
            ``pip install "vlamp[hf]"``; see :mod:`vlamp.models.hf_vla`).
        hf_config: For ``hf-vlm``: a local PaliGemma ``config.json`` (or its directory) to build
            the backbone from instead; empty: sized by the keys above.
        hf_pretrained: For ``hf-vlm`` with ``hf_config`` a directory: load the backbone's weights
            from the safetensors there (as ``save_pretrained`` writes them) instead of random init;
            local files only, never a download.
        size: The preset the shape started from: TinyVLA's ``SIZES`` (keys given beside it win),
            or, with ``name="hf-vlm"``, a real-size preset of :mod:`vlamp.models.presets`
            (``smolvla``: 0.45 B parameters, ``pi0``: 3.3 B), whose shapes are its own.
        dim: Width of the text encoder, the trunk and the head.
        depth: Trunk transformer layers.
        heads: Attention heads.
        text_layers: Text-encoder transformer layers.
        channels: CNN channels per stage; each stage halves the image side.
        chunk: Actions predicted per observation.
        head: ``"act"`` (learned queries, L1) or ``"flow"`` (flow matching, Euler sampling).
        flow_steps: Euler steps when sampling from the flow head.
        max_tokens: Instruction length in words (longer ones are cut).
        image_size: Side of the (square) input images; sizes the positional table.
        keypoints: Add one token of spatial-softmax keypoints (the expected image position of
            each channel of the second-to-last stage, robomimic's way to localise precisely)
            to the image tokens. Off by default: it paid only with shifted images (the README's
            ablation).
    """

    name: str = "tinyvla"
    hf_config: str = ""
    hf_pretrained: bool = False
    size: str = "small"
    dim: int = 128
    depth: int = 4
    heads: int = 4
    text_layers: int = 2
    channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128, 128])
    chunk: int = 16
    head: str = "act"
    flow_steps: int = 10
    max_tokens: int = 8
    vocab_size: int = 0
    state_dim: int = 4
    action_dim: int = 4
    image_size: int = 64
    keypoints: bool = False

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise VlampError(f"model.name must be one of {', '.join(MODEL_NAMES)}, got {self.name!r}")
        if self.size not in SIZES and self.size not in VLA_PRESETS:
            raise VlampError(f"model.size must be one of {', '.join(size_names())}, got {self.size!r}")
        if self.size in VLA_PRESETS and self.name != "hf-vlm":
            raise VlampError(f"model.size={self.size} is a real-size hf-vlm preset: use it with "
                             f"model.name=hf-vlm (TinyVLA's sizes: {', '.join(SIZES)})")
        if self.head not in HEADS:
            raise VlampError(f"model.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        for name in ("dim", "depth", "heads", "text_layers", "chunk", "flow_steps", "max_tokens"):
            if getattr(self, name) < 1:
                raise VlampError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 2 ** len(self.channels):
            raise VlampError(f"model.image_size ({self.image_size}) must be divisible by "
                             f"2^len(model.channels) = {2 ** len(self.channels)}")
        if self.dim % self.heads:
            raise VlampError(f"model.dim ({self.dim}) must be divisible by model.heads ({self.heads})")
        if not self.channels or min(self.channels) < 8 or any(c % 8 for c in self.channels):
            raise VlampError(f"model.channels must be multiples of 8 (GroupNorm of 8 groups), "
                             f"got {self.channels}")


def example_batch(config: ModelConfig, batch_size: int, device: torch.device | str = "cpu",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """A random training batch of ``config``'s shapes on ``device``: what every policy model's
    ``example_batch`` returns."""
    c, g = config, torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(batch_size, 3, c.image_size, c.image_size, generator=g),
             "state": torch.randn(batch_size, c.state_dim, generator=g),
             "tokens": torch.randint(1, c.vocab_size, (batch_size, c.max_tokens), generator=g),
             "actions": torch.randn(batch_size, c.chunk, c.action_dim, generator=g),
             "action_mask": torch.ones(batch_size, c.chunk, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}
