"""Frozen modules: no gradients, no optimizer state, weights unchanged by training and stored in
the compute dtype in a -mixed mode (FP32 islands inside keep FP32); describe marks them; the
trainer's train.freeze trains the rest and resumes."""

import pytest
import torch
from conftest import assert_resume_is_bit_exact, tiny_overrides
from torch import nn

from vlamp import MixedPrecision, VlampError
from vlamp.train.config_io import load_config
from vlamp.train.trainer import Trainer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.tower(x)).float().square().mean()


def trained(mode, steps=5, **kw):
    torch.manual_seed(0)
    model = Net()
    mp = MixedPrecision(mode, freeze=["tower"], **kw)
    mp.setup(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mp.setup(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        with mp.autocast():
            loss = model(x)
        mp.backward(loss)
        mp.step(opt)
    return model, mp, opt, before


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed", "bf16-true"])
def test_frozen_weights_do_not_move_hold_no_state_and_are_stored_low_in_mixed_modes(mode):
    model, mp, opt, before = trained(mode)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("tower."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    tower = set(map(id, model.tower.parameters()))
    assert not any(id(p) in tower for p in opt.state) and opt.state
    low = torch.float32 if mode == "fp32" else torch.bfloat16
    assert model.tower[0].weight.dtype == model.tower[2].weight.dtype == low
    assert model.tower[1].weight.dtype == torch.float32  # the norm stays an FP32 island
    assert model.head.weight.dtype == (torch.bfloat16 if mode == "bf16-true" else torch.float32)
    assert all(p.grad is None for p in model.tower.parameters())
    rows = {r["module"]: r for r in mp.describe().to_dicts()}
    assert rows["tower.0"]["optim"] == "frozen" and rows["tower.0"]["grad"] == "-"
    assert rows["tower.0"]["B/param"] == (4 if mode == "fp32" else 2)
    if mode == "bf16-mixed":
        assert rows["tower"]["rule"] == "frozen" and rows["head"]["B/param"] == 16


def test_a_pattern_that_matches_nothing_is_refused_naming_the_modules():
    with pytest.raises(VlampError, match="freeze: 'vision' matches no module of Net; its modules "
                                         "include tower, head"):
        MixedPrecision("bf16-mixed", freeze=["vision"]).setup(Net())
    mp = MixedPrecision("bf16-mixed", freeze=["Linear"])  # class names work as in rules
    model = Net()
    mp.setup(model)
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, nn.Linear)
                   for p in m.parameters())


@pytest.mark.slow
def test_the_trainer_freezes_trains_the_rest_and_resumes_bit_exactly(tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    def run(out, *more):
        cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-mixed", "train.freeze=[vision]",
                                               *more))
        trainer = Trainer(cfg, progress=False)
        return trainer, trainer.fit()

    trainer, result = run(tmp_path / "full")
    assert all(not p.requires_grad for p in trainer.model.vision.parameters())
    first = load_file(tmp_path / "full" / "checkpoints" / "step_0000003" / "model.safetensors")
    last = load_file(tmp_path / "full" / "checkpoints" / "step_0000006" / "model.safetensors")
    vision = [k for k in last if k.startswith("vision.")]
    assert vision and all(torch.equal(first[k], last[k]) for k in vision)
    assert any(not torch.equal(first[k], last[k]) for k in last if k.startswith("trunk."))
    assert_resume_is_bit_exact(tmp_path / "full", run)
