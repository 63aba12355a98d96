"""LoRA adapters: the adapted model starts as the original, only the adapters train, the frozen
bases are stored in low precision in a -mixed mode, and a merged checkpoint (FP32 merge, FP32
storage) acts as the adapted run does."""

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from vlamp import VlampError
from vlamp.models.config import ModelConfig
from vlamp.models.lora import LoRALinear, add_lora, merge_lora
from vlamp.models.tinyvla import TinyVLA


def tiny() -> TinyVLA:
    torch.manual_seed(0)
    return TinyVLA(ModelConfig(vocab_size=20, state_dim=4, action_dim=4, image_size=32, chunk=4,
                               dim=32, depth=2, heads=2, text_layers=1, channels=[8, 8]))


def test_adapters_start_at_zero_train_alone_and_merge_to_the_same_function():
    model = tiny()
    batch = model.example_batch(4)
    with torch.no_grad():
        before = model(batch)
    names = add_lora(model, ["trunk.*.qkv", "trunk.*.proj"], rank=4, alpha=8.0)
    assert names == ["trunk.0.qkv", "trunk.0.proj", "trunk.1.qkv", "trunk.1.proj"]
    with torch.no_grad():
        assert torch.equal(model(batch), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "trunk.0.qkv.lora_A.weight" in trainable and "trunk.0.qkv.base.weight" not in trainable
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
        adapted = model(batch)
    assert not torch.equal(adapted, before)
    assert merge_lora(model) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.trunk[0].qkv) is nn.Linear and model.trunk[0].qkv.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(batch), adapted, rtol=1e-5, atol=1e-6)


def test_a_target_that_matches_no_linear_layer_is_one_line():
    with pytest.raises(VlampError, match="lora: target 'trunk.*.attn' matches no linear layer of "
                                         "TinyVLA \\(e.g. text.layers.0.qkv"):
        add_lora(tiny(), ["trunk.*.attn"], rank=4, alpha=8.0)
    with pytest.raises(VlampError, match="rank must be >= 1"):
        add_lora(tiny(), ["trunk.*.qkv"], rank=0, alpha=8.0)


@pytest.mark.slow
def test_lora_training_and_its_merged_checkpoint(tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    from vlamp.train.config_io import load_config
    from vlamp.train.merge import merge_checkpoint
    from vlamp.train.policy import load_policy
    from vlamp.train.trainer import Trainer

    out = tmp_path / "lora"
    cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-mixed", "train.lora.rank=4",
                                           "train.lora.targets=[trunk.*.qkv]", "train.lr=1e-2"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    base = trainer.model.trunk[0].qkv.base.weight
    assert base.dtype == torch.bfloat16 and not base.requires_grad
    assert trainer.model.trunk[0].qkv.lora_A.weight.dtype == torch.float32
    first = load_file(out / "checkpoints" / "step_0000003" / "model.safetensors")
    last = load_file(out / "checkpoints" / "step_0000006" / "model.safetensors")
    assert torch.equal(first["trunk.0.qkv.base.weight"], last["trunk.0.qkv.base.weight"])
    assert not torch.equal(first["trunk.0.qkv.lora_B.weight"], last["trunk.0.qkv.lora_B.weight"])

    merged = merge_checkpoint(out, tmp_path / "merged")
    weights = load_file(merged / "model.safetensors")
    assert "trunk.0.qkv.weight" in weights and not any("lora_" in k for k in weights)
    with pytest.raises(VlampError, match="already holds checkpoints"):
        merge_checkpoint(out, tmp_path / "merged")
    with pytest.raises(VlampError, match="trained without LoRA adapters"):
        merge_checkpoint(merged, tmp_path / "again")
    for mode, tolerance in (("fp32", 1e-5), (None, 0.05)):  # in fp32 the same function; as trained,
        a = load_policy(str(out), mode=mode, device="cpu")  # bf16 rounding apart
        b = load_policy(str(merged), mode=mode, device="cpu")
        batch = a.policy.model.example_batch(4)
        with torch.no_grad(), a.policy.mp.autocast():
            pa = a.policy.model.predict(batch["image"], batch["state"], batch["tokens"])
        with torch.no_grad(), b.policy.mp.autocast():
            pb = b.policy.model.predict(batch["image"], batch["state"], batch["tokens"])
        assert float((pa - pb).abs().max()) <= tolerance * float(pa.abs().max()), mode
