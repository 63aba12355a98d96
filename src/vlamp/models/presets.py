"""Real-size ``hf-vlm`` presets: the shapes of published VLAs, built with random init.

``model.name=hf-vlm model.size=smolvla`` or ``model.size=pi0`` builds a policy with the parameter
count of the published model (never its weights: nothing is downloaded), so what vlamp measures
and plans — speed, memory, what fits — is measured at the size people train. Each preset is
PaliGemma's architecture (a SigLIP tower, a linear projector, a Gemma decoder) plus an action
expert: a smaller Gemma decoder that reads the backbone's last hidden states and the action
queries (see :class:`~vlamp.models.hf_vla.HFVLA`).

Where the shapes come from:

* ``pi0`` (Black et al. 2024, openpi ``pi0_config.py`` / ``gemma.py``): PaliGemma-3B = SigLIP
  So400m/14 (width 1152, depth 27, MLP 4304, 16 heads) + Gemma-2B (width 2048, depth 18, MLP
  16384, 8 heads, 1 KV head, head dim 256, vocabulary 257,152); the action expert is openpi's
  ``gemma_300m`` (width 1024, depth 18, MLP 4096, 8 heads, 1 KV head, head dim 256).
  Published: 3.3 B parameters; this preset: 3.25 B.
* ``smolvla`` (Shukor et al. 2025, LeRobot ``smolvla``): SmolVLM2-500M's SigLIP-base/16 tower
  (width 768, depth 12, MLP 3072, 12 heads) and the first 16 of its SmolLM2-360M decoder layers
  (width 960, MLP 2560, 15 heads, 5 KV heads, head dim 64, vocabulary 49,280); the expert is 0.75
  of the decoder's width (720) with 16 layers and an MLP of 2048. Published: 0.45 B; this preset:
  see :func:`vlamp.models.hf_vla.preset_parameters` (the test pins both within 10%).

Differences from the published models, named: the expert attends to the backbone's projected
last hidden states as a prefix of its own sequence (pi0 and SmolVLA share attention layer by
layer), SmolVLM's pixel-shuffle connector is PaliGemma's linear projector, images are the
dataset's size (the position table follows), and the head is vlamp's L1 chunk head.
"""

from __future__ import annotations

from typing import Any

# preset -> (vision config, decoder config, expert config, published parameters)
VLA_PRESETS: dict[str, dict[str, Any]] = {
    "smolvla": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, patch_size=16),
        "text": dict(vocab_size=49280, hidden_size=960, intermediate_size=2560, num_hidden_layers=16,
                     num_attention_heads=15, num_key_value_heads=5, head_dim=64),
        "expert": dict(hidden_size=720, intermediate_size=2048, num_hidden_layers=16,
                       num_attention_heads=15, num_key_value_heads=5, head_dim=64),
        "published": 450_000_000,
    },
    "pi0": {
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                       num_attention_heads=16, patch_size=14),
        "text": dict(vocab_size=257152, hidden_size=2048, intermediate_size=16384,
                     num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256),
        "expert": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=18,
                       num_attention_heads=8, num_key_value_heads=1, head_dim=256),
        "published": 3_300_000_000,
    },
}
