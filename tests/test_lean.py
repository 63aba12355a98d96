"""Lean islands: an FP32 island hands on the low-precision dtype where that is measured not to
matter, and the element-wise ops after it then compute and save in that dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlamp.precision import autoplan
from vlamp.precision.apply import _MARK, apply_plan
from vlamp.precision.autoplan import measure_plan
from vlamp.precision.errors import VlampError
from vlamp.precision.lean import LEAN, islands, lean_plan, measure_lean
from vlamp.precision.memory import ActivationMeter
from vlamp.precision.plan import PrecisionPlan
from vlamp.precision.verify import trace_compute_dtypes


class Net(nn.Module):
    """in -> Linear -> LayerNorm -> [GELU] -> Linear -> [pos_embed: + offset, - offset] ->
    action_out -> mean squared error. Every piece is optional, so each test builds the net whose
    islands it is about."""

    def __init__(self, gelu: bool = True, offset: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.act = nn.GELU() if gelu else nn.Identity()
        self.mid = nn.Linear(64, 64)
        self.pos_embed = Offset(offset) if offset is not None else None
        self.action_out = nn.Linear(64, 4)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, target = batch
        h = self.mid(self.act(self.norm(self.inp(x))))
        if self.pos_embed is not None:  # the offset comes off outside the island, in the parent
            h = self.pos_embed(h) - self.pos_embed.offset
        return ((self.action_out(h).float() - target) ** 2).mean()


class Offset(nn.Module):
    """Adds a large constant: rounding its output to BF16 (8 bits) erases what it was added to."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.offset


def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g)


def test_an_island_that_feeds_a_matmul_changes_nothing_and_leans_even_at_zero_tolerance():
    """LayerNorm -> Linear: the Linear casts its input to BF16 under autocast anyway, so the
    norm's rounded output gives the same gradients, bit for bit, on any CPU."""
    model = Net(gelu=False)
    rules, record = measure_lean(model, batch(), PrecisionPlan("bf16-mixed"), tolerance=0.0)
    assert list(record["islands"]) == ["norm"]  # action_out and the loss are the model's ends
    assert record["lean_error"] == record["mode_error"] > 0
    assert record["islands"]["norm"]["error_alone"] is None  # all together were within: one pass
    assert [(r.pattern, str(r.policy)) for r in rules] == [
        ("norm", "params=fp32,compute=fp32,output=bf16")]
    assert rules[0].label.startswith("builtin:norm(LayerNorm)" + LEAN)


def test_rounding_that_matters_keeps_the_island_fp32():
    """An offset of 4096 added in the island and taken off after it: in BF16, 4096 + h rounds to a
    multiple of 32, so everything h carried is lost. The measurement sees it."""
    model = Net(gelu=False, offset=4096.0)
    plan = PrecisionPlan("bf16-mixed")
    assert {r.name for r in islands(plan, model)} == {"norm", "pos_embed"}
    rules, record = measure_lean(model, batch(), plan)
    pos = record["islands"]["pos_embed"]
    assert pos["error_alone"] > 10 * record["mode_error"] and not pos["lean"]
    assert record["islands"]["norm"]["lean"]  # feeds a matmul: changes nothing
    assert [r.pattern for r in rules] == ["norm"]
    assert record["lean_error"] <= 1.25 * record["mode_error"]


def test_a_lean_island_hands_on_bf16_and_the_op_after_it_computes_and_saves_bf16():
    """Traced: GELU runs in BF16 after a lean norm (FP32 after an ordinary island), and what the
    forward saves for the backward shrinks by exactly the bytes GELU's FP32 input held."""
    x = batch()
    plan = PrecisionPlan("bf16-mixed")
    rules, _ = measure_lean(Net(), x, plan, tolerance=1.0)
    lean = lean_plan(plan, rules, {})
    saved, gelu = {}, {}
    for name, p in (("plain", plan), ("lean", lean)):
        model = Net()
        apply_plan(p.resolve(model))
        with ActivationMeter(model) as meter, p.mode.autocast("cpu"):
            model(x).backward()
        saved[name] = meter.total
        with p.mode.autocast("cpu"):
            seen = trace_compute_dtypes(model, lambda m=model: m(x), ops=frozenset({"gelu"}))
        gelu[name] = seen["act"]
    assert gelu == {"plain": {torch.float32}, "lean": {torch.bfloat16}}
    assert saved["plain"] - saved["lean"] == 32 * 64 * 2  # GELU's input: 4 bytes -> 2


def test_user_rules_stay_first_and_are_never_leaned():
    model = Net()
    plan = PrecisionPlan("bf16-mixed", {"norm": "fp32", "mid": "fp32"})
    assert islands(plan, model) == []  # the user decided the norm: not vlamp's to change
    assert measure_lean(model, batch(), plan) == ([], {"tolerance": 0.25, "dtype": "bf16",
                                                       "islands": {}})
    rules, record = measure_lean(model, batch(), PrecisionPlan("bf16-mixed", {"mid": "fp32"}),
                                 tolerance=1.0)
    leaned = lean_plan(PrecisionPlan("bf16-mixed", {"mid": "fp32"}), rules, record)
    assert [r.pattern for r in leaned.user_rules] == ["mid", "norm"]
    assert leaned.measured["lean"] is record
    again = PrecisionPlan.from_dict(leaned.to_dict())  # the lean rules travel as plain rules
    assert [str(r.policy) for r in again.user_rules] == [str(r.policy) for r in leaned.user_rules]


def test_the_model_and_the_rng_are_left_as_they_were():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measure_lean(model, batch(), PrecisionPlan("bf16-mixed"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(hasattr(m, _MARK) for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_measure_plan_leans_by_default_and_lean_none_keeps_the_islands(tmp_path):
    model = Net(gelu=False, offset=4096.0)
    leaned = measure_plan(model, batch(), "bf16-mixed", cache_dir=tmp_path, repeats=1)
    assert [r.pattern for r in leaned.user_rules if LEAN in r.label] == ["norm"]
    assert leaned.measured["lean"]["islands"]["pos_embed"]["lean"] is False
    plain = measure_plan(model, batch(), "bf16-mixed", cache_dir=tmp_path, repeats=1, lean=None)
    assert not any(LEAN in r.label for r in plain.user_rules)
    assert "lean" not in plain.measured
    with pytest.raises(VlampError, match="lean must be a fraction >= 0"):
        measure_plan(model, batch(), "bf16-mixed", lean=-0.1)


def test_an_auto_plan_that_falls_back_to_fp32_drops_the_lean_rules(monkeypatch, tmp_path):
    """Where the low-precision step is slower, auto trains in fp32: a lean rule kept there would
    cast an FP32 model's norm outputs to BF16."""
    monkeypatch.setattr(autoplan, "_time_steps", lambda *a, **k: {"fp32": 1.0, "bf16-mixed": 2.0})
    base = lean_plan(PrecisionPlan("bf16-mixed"), *measure_lean(Net(), batch(),
                                                                  PrecisionPlan("bf16-mixed"),
                                                                  tolerance=1.0))
    assert any(LEAN in r.label for r in base.user_rules)
    chosen, reason, _, _ = autoplan._measure(Net(), batch(), base, True, None, 1, 0.05,
                                             torch.device("cpu"))
    assert chosen.mode.name == "fp32" and "fp32 is faster" in reason
    assert not any(LEAN in r.label for r in chosen.user_rules)


def test_the_flow_heads_sampled_times_stay_fp32_and_its_time_embedding_leans():
    """A real case of each: rounding the sampled flow times to BF16 moves the interpolated
    actions and the velocity target (the gradients' error grows ~12x); the time embedding's sin/cos
    features feed a matmul (changes nothing)."""
    from vlamp.models.config import ModelConfig
    from vlamp.models.tinyvla import TinyVLA

    def flow() -> TinyVLA:
        torch.manual_seed(0)
        return TinyVLA(ModelConfig(vocab_size=50, state_dim=39, action_dim=4, image_size=32,
                                   chunk=4, dim=32, depth=2, heads=2, text_layers=1,
                                   channels=[8, 16], head="flow"))

    rules, record = measure_lean(flow(), flow().example_batch(16), PrecisionPlan("bf16-mixed"))
    islands_ = record["islands"]
    assert islands_["time_sampler"]["error_alone"] > 3 * record["mode_error"]
    assert not islands_["time_sampler"]["lean"] and islands_["time_embed"]["lean"]
    assert "time_sampler" not in {r.pattern for r in rules}
    assert record["lean_error"] <= 1.25 * record["mode_error"]
