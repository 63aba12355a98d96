"""The accuracy half of the measured plan: each module's own error in low precision."""

from __future__ import annotations

import pytest
import torch

from vlamp.models.config import ModelConfig
from vlamp.models.tinyvla import TinyVLA
from vlamp.precision.apply import _MARK
from vlamp.precision.autoplan import measure_plan
from vlamp.precision.errors import VlampError
from vlamp.precision.sensitivity import measure_sensitivity, sensitivity_plan


def flow_model() -> TinyVLA:
    torch.manual_seed(0)
    return TinyVLA(ModelConfig(vocab_size=50, state_dim=39, action_dim=4, image_size=32, chunk=4,
                               dim=32, depth=2, heads=2, text_layers=1, channels=[8, 16], head="flow"))


def test_a_time_embedding_in_bf16_shows_its_error():
    """Flow times near 1 times frequencies up to 1,570 rad: in bf16 (bf16-true casts the inputs
    and the frequency table) the angles lose whole radians; in bf16-mixed they stay FP32 (autocast
    leaves sin/cos alone) and only the output is rounded."""
    model = flow_model()
    batch = model.example_batch(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    true = measure_sensitivity(model, batch, "bf16-true")
    mixed = measure_sensitivity(model, batch, "bf16-mixed")
    assert true["time_embed"]["output_error"] > 0.1
    assert mixed["time_embed"]["output_error"] < 0.01
    linear = mixed["trunk.0.qkv"]
    assert 0 < linear["output_error"] < 0.01 and 0 < linear["grad_error"] < 0.02
    # The noise sampler draws the same in both runs (its bf16 output is only rounded), not two
    # different draws (a relative error near 1.4).
    assert true["time_sampler"]["output_error"] < 0.01
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, _MARK) for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_plan_from_sensitivity_alone():
    model = flow_model()
    batch = model.example_batch(16)
    plan, table = sensitivity_plan(model, batch, "bf16-true", threshold=0.1)
    assert not plan.builtin_rules
    kept = {r.pattern for r in plan.user_rules}
    assert "time_embed" in kept and kept == {n for n, r in table.items() if r["kept_fp32"]}
    assert all(max(table[n]["output_error"], table[n]["grad_error"]) > 0.1 for n in kept)
    assert all(r.label.startswith("sensitive:bf16 error") for r in plan.user_rules)
    resolved = {r.name: r.policy for r in plan.resolve(model)}
    assert resolved["time_embed"].compute == torch.float32
    assert resolved["trunk.0.qkv"].compute == torch.bfloat16


def test_measure_plan_joins_accuracy_and_speed(tmp_path):
    """``sensitivity=`` in the measured plan: for a -true mode too, the sensitive modules are kept
    FP32 before the speed half times the rest; the threshold is part of the cache key."""
    model = flow_model()
    batch = model.example_batch(8)
    plan = measure_plan(model, batch, "bf16-true", sensitivity=0.1, cache_dir=tmp_path)
    assert "time_embed" in {r.pattern for r in plan.user_rules} and not plan.builtin_rules
    with pytest.raises(VlampError, match="sensitivity must be a relative error > 0"):
        measure_plan(model, batch, "bf16-mixed", sensitivity=0.0, cache_dir=tmp_path)
