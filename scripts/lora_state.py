"""What LoRA holds on the SmolVLA-sized hf-vlm: adapters of rank 16 on every linear layer, every
other weight frozen (embeddings, the patch convolution, norms, the SigLIP head's attention), and
the state per parameter of the whole model that MixedPrecision.describe counts.

    python scripts/lora_state.py bf16-storage auto     # mode, precision.optimizer_state
    python scripts/lora_state.py bf16-mixed auto
    python scripts/lora_state.py bf16-storage 8bit

The same setting trains with `vlamp train model.name=hf-vlm model.size=smolvla
precision.mode=bf16-storage train.lora.rank=16 'train.lora.targets=[Linear]'
'train.freeze=[Embedding,Conv2d,LayerNorm,GemmaRMSNorm,MultiheadAttention]'`.
Builds the model in FP32 first (1.6 GB).
"""

import sys

import torch

from vlamp import MixedPrecision
from vlamp.models.lora import add_lora, frozen_bases
from vlamp.models.registry import build_model
from vlamp.precision.weight_update import UpdateSettings
from vlamp.train.config import load_config

FREEZE = ["Embedding", "Conv2d", "LayerNorm", "GemmaRMSNorm", "MultiheadAttention"]


def main(mode: str = "bf16-storage", state: str = "auto", rank: int = 16) -> None:
    torch.set_num_threads(1)
    config = load_config(None, ["model.name=hf-vlm", "model.size=smolvla"]).model
    config.vocab_size = 1000  # the tokenizer's size on a dataset; it does not change the picture
    model = build_model(config)
    adapted = add_lora(model, ["Linear"], rank, 16.0)
    freeze = [*FREEZE, *frozen_bases(adapted)]
    mp = MixedPrecision(mode, freeze=freeze, update=UpdateSettings(optimizer_state=state))
    model, _ = mp.setup(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{mode}, optimizer state {state}: {total:,} parameters, {trainable:,} trained "
          f"({100 * trainable / total:.2f}%)")
    print(mp.describe(max_depth=0))


if __name__ == "__main__":
    main(*sys.argv[1:3])
