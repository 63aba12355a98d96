"""The measured plan: a module that is slower in low precision is kept in FP32 (and one that is
faster is not), the whole-step check never picks a slower mode, and the cache hits, misses and is
invalidated when what it was measured for changes.

The "slow" modules do not sleep: they advance the clock the measurement reads by a virtual second,
so their slowness dwarfs any real timing, on a quiet core or a busy one, with or without native
bf16."""

import gc
import time
import types
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlamp import MixedPrecision, PrecisionPlan, VlampError, describe_plan
from vlamp.precision import autoplan
from vlamp.precision.autoplan import measure_plan
from vlamp.precision.hardware import Choice, choose_mode, detect
from vlamp.precision.plan import plan_for
from vlamp.precision.probe import planned_copy
from vlamp.precision.verify import trace_compute_dtypes

NATIVE_BF16 = choose_mode(detect("cpu")).mode == "bf16-mixed"
DELAY = 1.0  # virtual seconds a slow module adds to the measurement's clock
_virtual = [0.0]


def slow_down(seconds):
    _virtual[0] += seconds


@pytest.fixture(autouse=True)
def virtual_clock(monkeypatch):
    """The measurement's clock: real time plus the virtual delays of the slow modules."""
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + _virtual[0])
    monkeypatch.setattr(autoplan, "time", clock)


class SlowInLowPrecision(nn.Module):
    """Built to be slow where its input is not FP32 (like bf16 attention on a CPU)."""

    calls = 0
    computed_on = None

    def forward(self, x):
        SlowInLowPrecision.calls += 1
        SlowInLowPrecision.computed_on = x.dtype
        if x.dtype != torch.float32:
            slow_down(DELAY)
        return x * 2.0


class SlowInFP32(nn.Module):
    """Built to be slow where its input is FP32 (like a matmul on tensor cores)."""

    computed_on = None

    def forward(self, x):
        SlowInFP32.computed_on = x.dtype
        if x.dtype == torch.float32:
            slow_down(DELAY)
        return x * 2.0


class Net(nn.Module):
    def __init__(self, slow_root: bool = False, slow_root_fp32: bool = False):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.slow_low = SlowInLowPrecision()
        self.mid = nn.Linear(16, 16)
        self.slow_fp32 = SlowInFP32()
        self.out = nn.Linear(16, 1)
        self.slow_root, self.slow_root_fp32 = slow_root, slow_root_fp32

    def forward(self, batch):
        low = torch.is_autocast_enabled("cpu")
        if (self.slow_root and low) or (self.slow_root_fp32 and not low):
            slow_down(4 * DELAY)  # the root's own work: no rule on a leaf can help
        x = self.out(self.slow_fp32(self.mid(self.slow_low(self.inp(batch["x"])))))
        return x.float().square().mean()


def batch(n=4):
    return {"x": torch.randn(n, 8)}


def measure(model, b, tmp_path, mode="bf16-mixed", **kw):
    return measure_plan(model, b, mode, cache_dir=tmp_path, require_native=False, repeats=3, **kw)


def test_keeps_fp32_exactly_where_low_precision_is_slower(tmp_path):
    model = Net()
    plan = measure(model, batch(), tmp_path)
    m = plan.measured
    assert plan.mode.name == "bf16-mixed" and not m["from_cache"]
    assert set(m["modules"]) == {"inp", "slow_low", "mid", "slow_fp32", "out"}
    assert m["modules"]["slow_low"]["kept_fp32"] and not m["modules"]["slow_fp32"]["kept_fp32"]
    assert m["modules"]["slow_low"]["low_ms"] > 1e3 * DELAY > m["modules"]["slow_low"]["fp32_ms"]
    kept = [r.pattern for r in plan.user_rules]
    assert "slow_low" in kept and "slow_fp32" not in kept
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float32 for p in model.parameters())

    # applied, the rule changes what runs: slow_low sees FP32, the linears around it bf16
    mp = MixedPrecision(plan)
    mp.setup(model)
    b = batch()

    def forward():
        with mp.autocast():
            model(b)

    seen = trace_compute_dtypes(model, forward)
    # mid is a real Linear: kept in FP32 or not as this machine timed it (a busy core can tip a
    # module this small either way); what slow_fp32 then receives follows from that decision
    mid = torch.float32 if m["modules"]["mid"]["kept_fp32"] else torch.bfloat16
    assert (SlowInLowPrecision.computed_on, SlowInFP32.computed_on) == (torch.float32, mid)
    assert seen["mid"] == {mid}
    rows = {r["module"]: r for r in describe_plan(plan, Net()).to_dicts()}
    assert rows["slow_low"]["rule"].startswith("measured:bf16") and rows["slow_low"]["compute"] == "fp32"
    assert rows["slow_fp32"]["rule"] == "inherited" and rows["slow_fp32"]["measured"].startswith("fp32 ")
    assert "measured" in str(describe_plan(plan, Net())).splitlines()[0]  # the column is shown


def test_measured_plan_round_trips_through_yaml(tmp_path):
    plan = measure(Net(), batch(), tmp_path / "cache")
    plan.save(tmp_path / "plan.yaml")
    again = PrecisionPlan.load(tmp_path / "plan.yaml")
    assert again.to_dict() == plan.to_dict()
    assert [r.label for r in again.user_rules] == [r.label for r in plan.user_rules]
    assert again.measured["modules"]["slow_low"]["kept_fp32"]


def test_cache_hit_miss_and_invalidation(tmp_path, monkeypatch):
    first = measure(Net(), batch(), tmp_path)
    assert not first.measured["from_cache"] and len(list(tmp_path.glob("*.yaml"))) == 1

    SlowInLowPrecision.calls = 0
    hit = measure(Net(), batch(), tmp_path)
    assert hit.measured["from_cache"] and SlowInLowPrecision.calls == 0  # nothing was run
    assert hit.to_dict()["rules"] == first.to_dict()["rules"]

    assert not measure(Net(), batch(8), tmp_path).measured["from_cache"]     # another batch shape
    assert not measure(nn.Sequential(Net()), batch(), tmp_path).measured["from_cache"]  # model
    assert not measure(Net(), batch(), tmp_path, margin=0.5).measured["from_cache"]
    assert not measure(Net(), batch(), tmp_path, refresh=True).measured["from_cache"]
    monkeypatch.setattr(torch, "__version__", "9.9.9")                        # another torch
    assert not measure(Net(), batch(), tmp_path).measured["from_cache"]
    monkeypatch.undo()

    # a damaged cache entry is said and measured again, not trusted
    for path in tmp_path.glob("*.yaml"):
        path.write_text("rules: [oops")
    with pytest.warns(UserWarning, match="ignoring the cached plan"):
        again = measure(Net(), batch(), tmp_path)
    assert not again.measured["from_cache"]
    assert measure(Net(), batch(), tmp_path).measured["from_cache"]          # and re-cached


def test_the_model_is_left_untouched_and_a_set_up_model_is_refused(tmp_path):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = batch()
    rng = torch.get_rng_state()
    measure(model, b, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    MixedPrecision("bf16-mixed").setup(model)
    with pytest.raises(VlampError, match="already has a precision plan"):
        measure(model, batch(), tmp_path)



class NormedNet(nn.Module):
    """A LayerNorm island (for the lean half) and a BatchNorm whose running statistics every forward
    pass in training mode moves; counts the copies of itself alive at each forward pass."""

    alive = weakref.WeakSet()
    most_alive = 0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.bn = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.norm, self.out = nn.LayerNorm(16), nn.Linear(16, 1)

    def forward(self, batch):
        NormedNet.alive.add(self)
        if len(NormedNet.alive) > NormedNet.most_alive:
            gc.collect()  # (a copy let go of may wait in a reference cycle)
            NormedNet.most_alive = max(NormedNet.most_alive, len(NormedNet.alive))
        return self.out(torch.relu(self.norm(self.bn(self.inp(batch["x"]))))).float().square().mean()


def test_every_half_leaves_the_models_buffers_and_grads_and_holds_two_sets_of_weights(tmp_path):
    """The FP32 passes run on the model itself (a copy would hold a third set of weights beside
    the planned copy) and put back what they change: BatchNorm's statistics, the ``.grad``."""
    model = NormedNet()
    model.inp.weight.grad = torch.full_like(model.inp.weight, 0.5)
    grad = model.inp.weight.grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    NormedNet.alive, NormedNet.most_alive = weakref.WeakSet([model]), 0
    leaned = measure(model, batch(8), tmp_path)
    accurate = measure(model, batch(8), tmp_path, sensitivity=1.0)
    assert leaned.measured["lean"]["islands"] and accurate.measured["step_ms"]  # every half ran
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.bn.num_batches_tracked == 0
    assert model.inp.weight.grad is grad and bool((grad == 0.5).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "inp.weight")
    assert NormedNet.most_alive == 2  # the model and one copy at a time


class Allocations(TorchDispatchMode):
    """Records the dtype and size of every tensor the ops run inside it make (views, in-place ops
    and ``detach`` return what exists already: their schemas say their result aliases an input)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.made += [(t.dtype, t.numel()) for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor)]
        return out


def test_a_planned_copy_is_made_in_its_planned_dtypes():
    """A frozen layer in bf16-mixed is copied straight into bf16: the copy never holds a second FP32
    set of its weights (on a large model, the measurement's peak); the model is left as it was."""
    model = NormedNet()
    model.inp = nn.Linear(8, 4096)
    model.bn, model.norm, model.out = nn.BatchNorm1d(4096), nn.LayerNorm(4096), nn.Linear(4096, 1)
    plan = plan_for("bf16-mixed", None)
    with Allocations() as seen:
        copy, _ = planned_copy(model, plan, ["inp"])
    fp32_made = sum(n for dtype, n in seen.made if dtype == torch.float32)
    assert fp32_made < model.inp.weight.numel()  # the trained layers' FP32 copies only
    assert (torch.bfloat16, model.inp.weight.numel()) in seen.made
    assert copy.inp.weight.dtype == torch.bfloat16 and not copy.inp.weight.requires_grad
    assert torch.equal(copy.inp.weight, model.inp.weight.detach().to(torch.bfloat16))
    assert copy.out.weight.dtype == torch.float32 and copy.out.weight.requires_grad
    assert model.inp.weight.dtype == torch.float32 and model.inp.weight.requires_grad


class SeenLinear(nn.Linear):
    """A Linear that records, at every forward pass, its weight's dtype, whether it trains, and
    whether the pass is under autocast."""

    seen: list = []

    def forward(self, x):
        self.seen.append((self.weight.dtype, self.weight.requires_grad,
                          torch.is_autocast_enabled("cpu")))
        return super().forward(x)


def test_frozen_modules_are_measured_as_the_run_trains_them(tmp_path):
    """``freeze``: in every pass, FP32 and low precision, the frozen layer computes no weight
    gradient, and in bf16-mixed its copies store it in bf16 as MixedPrecision will; the model keeps
    its own flags and dtypes, and the plan carries no storage rule of its own for it."""
    model = NormedNet()
    model.inp = SeenLinear(8, 16)
    SeenLinear.seen = []  # (on the class: every copy records here)
    plan = measure(model, batch(8), tmp_path, freeze=["inp"])
    seen = set(SeenLinear.seen)
    assert (torch.float32, False, False) in seen  # the FP32 passes, on the model itself
    assert (torch.bfloat16, False, True) in seen  # the planned copies
    assert not any(trains for _, trains, _ in seen)
    assert model.inp.weight.requires_grad and model.inp.weight.dtype == torch.float32
    assert not any(r.label == "frozen" for r in plan.user_rules)
    assert measure(model, batch(8), tmp_path).measured["key"] != plan.measured["key"]
    with pytest.raises(VlampError, match="'nowhere' matches no module"):
        measure(model, batch(8), tmp_path, freeze=["nowhere"])

class SlowLinear(nn.Linear):
    """A Linear built to be slow where its input is not FP32 (weights of its own, unlike
    :class:`SlowInLowPrecision`)."""

    def forward(self, x):
        if x.dtype != torch.float32:
            slow_down(DELAY)
        return super().forward(x)


def test_a_true_mode_keeps_only_the_compute_of_a_slow_module_in_fp32(tmp_path):
    """bf16-true is measured too, but its memory is its point: a module kept in FP32 computes in
    FP32 over its weights still stored in bf16 and hands on bf16, so no byte more is stored."""
    def loss_fn(model, b):
        return model(b["x"]).float().square().mean()

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), SlowInLowPrecision(), SlowLinear(16, 16),
                             nn.Linear(16, 1))

    plan = measure(net(), batch(), tmp_path, mode="bf16-true", loss_fn=loss_fn)
    m = plan.measured
    assert plan.mode.name == "bf16-true"
    assert m["modules"]["1"]["kept_fp32"] and m["modules"]["2"]["kept_fp32"]
    rules = {r.pattern: r.policy for r in plan.user_rules}
    assert str(rules["1"]) == str(rules["2"]) == "params=bf16,compute=fp32,output=bf16"
    measured, plain = net(), net()
    MixedPrecision(plan).setup(measured)
    MixedPrecision("bf16-true").setup(plain)
    assert [(n, p.dtype) for n, p in measured.named_parameters()] == [
        (n, p.dtype) for n, p in plain.named_parameters()]
    assert {p.dtype for p in measured.parameters()} == {torch.bfloat16}
    out_dtypes = []
    measured[2].register_forward_hook(lambda mod, a, out: out_dtypes.append(out.dtype))
    x = batch()["x"]

    def forward():
        with MixedPrecision(plan).autocast():
            return loss_fn(measured, {"x": x})

    seen = trace_compute_dtypes(measured, forward)
    # the real Linears around them: kept in FP32 or not as this machine timed them
    for name in ("0", "2", "3"):
        assert seen[name] == {torch.float32 if m["modules"][name]["kept_fp32"] else torch.bfloat16}
    assert SlowInLowPrecision.computed_on == torch.float32 and out_dtypes == [torch.bfloat16]
    forward().backward()  # the gradient reaches the weight where it is stored, in bf16
    grad = measured[2].weight.grad
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0


def test_a_storage_mode_that_computes_in_fp32_is_not_measured(tmp_path):
    plan = measure(Net(), batch(), tmp_path, mode="bf16-storage")
    assert plan.mode.name == "bf16-storage" and not plan.user_rules
    assert "computes every module in FP32" in plan.measured["reason"]


def test_auto_never_picks_a_slower_mode(tmp_path, monkeypatch):
    # the hardware proposes bf16-mixed here whatever this CPU is; the measured step decides
    monkeypatch.setattr(autoplan, "choose_mode", lambda hw: Choice("bf16-mixed", "proposed"))
    slow = measure_plan(Net(slow_root=True), batch(), "auto", cache=False, repeats=3)
    assert slow.mode.name == "fp32" and "fp32 is faster" in slow.measured["reason"]
    fast = measure_plan(Net(slow_root_fp32=True), batch(), "auto", cache=False, repeats=3)
    assert fast.mode.name == "bf16-mixed"
    # fp32 pays the root's 4 virtual seconds; bf16-mixed at most slow_fp32's one (if this machine
    # timed the real Linear before it faster in FP32, slow_fp32 gets FP32 input)
    assert fast.measured["step_ms"]["fp32"] > 4e3 * DELAY > 2e3 * DELAY > fast.measured["step_ms"]["bf16-mixed"]


@pytest.mark.skipif(NATIVE_BF16, reason="checks the machines without native bf16")
def test_auto_is_fp32_without_native_low_precision(tmp_path):
    plan = measure_plan(Net(), batch(), "auto", cache_dir=tmp_path)
    assert plan.mode.name == "fp32" and "emulated" in plan.measured["reason"]
    named = measure_plan(Net(), batch(), "bf16-mixed", cache_dir=tmp_path)
    assert not named.user_rules and "no native bf16" in named.measured["reason"]


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(VlampError, match="repeats must be >= 1"):
        measure_plan(Net(), batch(), "bf16-mixed", repeats=0, cache_dir=tmp_path)
    with pytest.raises(TypeError):  # measuring is measure_plan's job, not the constructor's
        MixedPrecision("auto", model=Net())
