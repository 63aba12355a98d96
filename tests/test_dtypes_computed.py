"""The dtypes a plan rules are the dtypes the kernels run in (traced at the aten level)."""

import pytest
import torch
from demo_model import DemoVLA
from torch import nn

from vlamp import MixedPrecision
from vlamp.precision.verify import trace_compute_dtypes

ISLANDS = {"vision.1", "pos_embed", "trunk.norm1", "trunk.norm2", "action_out"}


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed", "bf16-true", "fp16-mixed", "fp16-true"])
def test_every_module_computes_in_its_ruled_dtype(mode):
    model = DemoVLA()
    mp = MixedPrecision(mode)
    mp.setup(model, torch.optim.AdamW(model.parameters()))
    image, tokens = DemoVLA.example_inputs()

    ran = set()
    for name, m in model.named_modules():
        m.register_forward_pre_hook(lambda mod, args, name=name: ran.add(name))

    def run():  # forward and backward: the gradient kernels are checked too
        with mp.autocast():
            out = model(image, tokens)
        mp.backward(out.float().square().mean())

    seen = trace_compute_dtypes(model, run, backward=True)
    expected = {r.name: r.policy.compute for r in mp.plan.resolve(model)}
    # Every module with compute ops was seen (none left unchecked), and ran in its ruled dtype. The
    # one exception is accounted for: MultiheadAttention uses out_proj's weights without calling it.
    computing = {n for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention))}
    assert computing - ran == {"trunk.self_attn.out_proj"}
    assert computing - {"trunk.self_attn.out_proj"} <= set(seen), computing - set(seen)
    for name, dtypes in seen.items():
        assert dtypes == {expected[name]}, (mode, name, dtypes)
    low = mp.mode.compute_dtype
    assert seen["trunk.linear1"] == {low} and seen["action_out"] == {torch.float32}
    # parameters are stored where the plan says
    for r in mp.plan.resolve(model):
        for p in r.module.parameters(recurse=False):
            assert p.dtype == r.policy.param, (mode, r.name)


def test_without_builtin_rules_norms_run_low():
    model = DemoVLA()
    mp = MixedPrecision("bf16-mixed", builtin_rules=False)
    mp.setup(model)
    image, tokens = DemoVLA.example_inputs()

    def run():
        with mp.autocast():
            model(image, tokens)

    seen = trace_compute_dtypes(model, run)
    assert seen["action_out"] == {torch.bfloat16}
    assert seen["vision.1"] == {torch.bfloat16}  # autocast alone does not keep GroupNorm in fp32


def test_bf16_module_inside_fp32_region_computes_bf16():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    mp = MixedPrecision("bf16-mixed", {"1": "fp32", "1.1": "p=fp32,c=bf16"})
    mp.setup(model)

    def run():
        with mp.autocast():
            return model(torch.randn(2, 8))

    seen = trace_compute_dtypes(model, run)
    assert seen == {"0": {torch.bfloat16}, "1.0": {torch.float32}, "1.1": {torch.bfloat16}}


def test_autocast_state_is_restored_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    mp = MixedPrecision("bf16-mixed", {"1": "fp32"})
    mp.setup(model)
    with mp.autocast():
        assert torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(1, 4))
        assert torch.is_autocast_enabled("cpu")  # the island's "autocast off" did not leak
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_gradients_flow_through_islands_in_every_dtype():
    model = DemoVLA()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-true")
    mp.setup(model, opt)
    image, tokens = DemoVLA.example_inputs()
    with mp.autocast():
        loss = model(image, tokens).float().pow(2).mean()
    mp.backward(loss)
    masters = {id(m) for m in mp.weights.masters}
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for g in opt.param_groups for p in g["params"])
    assert len(masters) > 0
