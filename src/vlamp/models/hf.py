"""Hugging Face transformers backbones, built from a config alone (random init; nothing is ever
downloaded): small named presets of the families VLA policies are built on, or a user's local
``config.json``. Needs the optional extra ``pip install "vlamp[hf]"``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlamp.precision.errors import VlampError

_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8)

# preset -> (model class, config class, config arguments); tiny, for checks and examples.
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _TEXT),  # also SmolLM's architecture
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**_TEXT, "head_dim": 8}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _TEXT),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", _VISION),
    "dinov2": ("Dinov2Model", "Dinov2Config", _VISION),
    "paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaConfig", dict(
        vision_config={**_VISION, "num_hidden_layers": 1, "projection_dim": 32},
        text_config={**_TEXT, "vocab_size": 80, "num_key_value_heads": 1, "head_dim": 8},
        image_token_index=79, vocab_size=80, projection_dim=32, hidden_size=32)),
}


def transformers_module():
    """The ``transformers`` package, offline.

    Raises:
        VlampError: If it is not installed (with the command that installs it).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config, never a download
    try:
        import transformers
    except ImportError:
        raise VlampError('Hugging Face models need transformers: pip install "vlamp[hf]"') from None
    return transformers


def build_hf_model(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised transformers model.

    Args:
        spec: A preset name (see :data:`PRESETS`), or a local ``config.json`` (or a directory
            holding one) of any model class transformers knows (its ``architectures`` entry
            names the class; else the family's base model).
        device: Where to build it; ``"meta"`` allocates nothing (enough for ``vlamp plan``, even
            for a config of billions of parameters).

    Raises:
        VlampError: On an unknown preset, a missing or unreadable config, or a missing extra.
    """
    path = Path(spec)
    if spec not in PRESETS:  # said before transformers is imported (seconds)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            from vlamp.models.presets import VLA_PRESETS

            vla = (f"; the {spec}-sized VLA is model.name=hf-vlm model.size={spec} (no --model)"
                   if spec in VLA_PRESETS else "")
            raise VlampError(f"model {spec!r}: not a preset ({', '.join(PRESETS)}) and no "
                             f"config.json there{vla}")
    T = transformers_module()
    if spec in PRESETS:
        model_cls, config_cls, kwargs = PRESETS[spec]
        config = getattr(T, config_cls)(**kwargs)
        cls = getattr(T, model_cls)
    else:
        config = read_config(path, "model")
        names = getattr(config, "architectures", None) or []
        cls = next((getattr(T, n) for n in names if hasattr(T, n)), None)
    with torch.device(device):
        return cls(config) if cls is not None else T.AutoModel.from_config(config)


def read_config(path: Path, where: str):
    """The transformers config in the ``config.json`` at ``path``.

    Raises:
        VlampError: In one line naming ``where``, if the file is not JSON or not a transformers
            config (no ``model_type``, or one this transformers does not know).
    """
    T = transformers_module()
    try:
        return T.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        text = str(e)
        if "model_type" in text:  # transformers lists every model type it knows after this
            why = "it has no model_type key (e.g. \"model_type\": \"paligemma\") that this transformers knows"
        elif "JSON" in text or "json" in text:
            why = "it is not valid JSON"
        else:
            why = text.splitlines()[0][:200] if text else type(e).__name__
        raise VlampError(f"{where}: {path} is not a transformers config: {why}") from None
