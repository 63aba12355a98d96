"""Memory by kind: activations measured by saved-tensor hooks, FP32 islands that save their inputs
in the low precision they arrived in (same gradients, fewer bytes), activation checkpointing by
rule (the modules recompute, the gradients do not change), and the state bytes per parameter."""

import contextlib

import pytest
import torch
from torch import nn

from vlamp import MixedPrecision
from vlamp.precision import apply
from vlamp.precision.memory import ActivationMeter, checkpoint_modules, state_memory


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.norm = nn.LayerNorm(256)  # an FP32 island (built-in rule)
        self.down = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x)))).float().square().mean()


class InplaceNorm(nn.LayerNorm):
    """An island that changes its (FP32 copy of the) input in place before normalising it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mul(2.0)  # saves x for the backward
        x.mul_(0.5)  # then x changes: its saved copy must not be replaced by the original
        return super().forward(y + x)


def step(model, compress=True, meter=False):
    """One bf16-mixed forward and backward: the gradients and, with ``meter``, the meter."""
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    mp = MixedPrecision("bf16-mixed")
    mp.setup(model)
    with pytest.MonkeyPatch.context() as mpatch:
        if not compress:  # the boundary saves its FP32 copies, as before
            mpatch.setattr(apply, "saving_low_precision", lambda upcasts: contextlib.nullcontext())
        with ActivationMeter(model) if meter else contextlib.nullcontext() as m:
            with mp.autocast():
                loss = model(x)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, m


def fresh():
    torch.manual_seed(1)
    return Net()


def test_an_fp32_island_saves_its_input_in_the_precision_it_arrived_in():
    plain_grads, plain = step(fresh(), compress=False, meter=True)
    grads, lean = step(fresh(), compress=True, meter=True)
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[k], plain_grads[k]) for k in grads)  # the same bits
    # LayerNorm saves its input: 32 x 256 in FP32 (32 KiB) before, the BF16 original (16 KiB) now
    assert plain.by_module["norm"] - lean.by_module["norm"] == 32 * 256 * 2
    assert lean.by_dtype["bfloat16"] > plain.by_dtype["bfloat16"]


def test_an_input_changed_in_place_inside_the_island_is_saved_as_it_is():
    def net():
        m = fresh()
        m.norm = InplaceNorm(256)
        return m
    plain, _ = step(net(), compress=False)
    lean, _ = step(net(), compress=True)
    assert all(torch.equal(lean[k], plain[k]) for k in lean)


def test_activation_meter_attributes_saved_bytes_to_the_innermost_module():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with ActivationMeter(model) as m:
        model(x).sum().backward()
    # Linear 0 saves its input (8x16 fp32), ReLU its output (8x32), Linear 2 its input: that same
    # ReLU output, counted once. Weights are not activations.
    assert m.by_module == {"0": 8 * 16 * 4, "1": 8 * 32 * 4}
    assert m.total == 8 * 48 * 4 and m.subtree("1") == 8 * 32 * 4


class Counting(nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counting.calls += 1
        return super().forward(x)


def test_checkpointed_modules_recompute_and_give_the_same_gradients():
    def run(patterns):
        model = fresh()
        model.up = Counting(64, 256)
        mp = MixedPrecision("bf16-mixed")
        mp.setup(model)
        assert checkpoint_modules(model, patterns) == (["up"] if patterns else [])
        Counting.calls = 0
        torch.manual_seed(0)
        x = torch.randn(32, 64, requires_grad=True)
        with ActivationMeter(model) as meter:
            with mp.autocast():
                loss = model(x)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, Counting.calls, meter
    plain, plain_calls, plain_meter = run([])
    ckpt, ckpt_calls, ckpt_meter = run(["up"])
    assert plain_calls == 1 and ckpt_calls == 2  # the forward ran again in the backward
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)
    assert ckpt_meter.subtree("up") < plain_meter.subtree("up")
    with pytest.raises(ValueError, match="'nope' matches no module of Net"):
        checkpoint_modules(fresh(), ["nope"])


def test_state_bytes_by_kind_per_parameter():
    def held(mode, update="master", builtin=True):
        m = nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128))
        opt = torch.optim.AdamW(m.parameters())
        mp = MixedPrecision(mode, update=update, builtin_rules=builtin)
        mp.setup(m, opt)
        with mp.autocast():
            loss = m(torch.randn(4, 128)).float().square().mean()
        mp.backward(loss)
        mp.step(opt)
        steps = 4 * len(list(m.parameters()))  # AdamW's step count: one FP32 scalar per tensor
        memory = state_memory(m, opt, mp)
        memory["state_bytes"] -= steps
        return memory, sum(p.numel() for p in m.parameters())
    fp32, n = held("fp32")
    assert fp32["state_bytes"] == 16 * n and fp32["masters_bytes"] == 0
    sr, n = held("bf16-true", "stochastic", builtin=False)
    assert sr["state_bytes"] == 8 * n and sr["compensation_bytes"] == 0
    kahan, n = held("bf16-true", "kahan", builtin=False)
    assert kahan["state_bytes"] == 10 * n and kahan["compensation_bytes"] == 2 * n
    master, n = held("bf16-true", builtin=False)
    assert master["masters_bytes"] == 4 * n and master["state_bytes"] == 18 * n


def test_lean_islands_compute_norms_in_fp32_and_save_fewer_bytes(tmp_path):
    """TinyVLA's measured lean islands: every norm still computes in FP32 (traced), those that
    lean hand on BF16, and the forward saves fewer bytes than with every island handing on FP32."""
    from vlamp.models.config import ModelConfig
    from vlamp.models.tinyvla import TinyVLA
    from vlamp.precision.autoplan import measure_plan
    from vlamp.precision.lean import LEAN
    from vlamp.precision.plan import PrecisionPlan
    from vlamp.precision.verify import trace_compute_dtypes

    def build():
        torch.manual_seed(0)
        return TinyVLA(ModelConfig(dim=32, depth=1, heads=2, text_layers=1, channels=[8, 8],
                                   chunk=4, vocab_size=20, image_size=32))

    batch = build().example_batch(8)

    model = build()
    # (a tiny untrained model's gradient error is large and noisy, 10-20%, and moves with the
    # CPU's kernels: the decision is tested in test_lean.py; here, what a lean island does)
    plan = measure_plan(model, batch, "bf16-mixed", lean=10.0, cache_dir=tmp_path, repeats=1)
    # the same plan with every island handing on FP32: the speed half's timed rules, which move
    # with the machine's noise, are kept, so only the lean islands differ
    plain_plan = PrecisionPlan(plan.mode, [r for r in plan.user_rules if LEAN not in r.label],
                               builtin_rules=plan.builtin_rules)

    def run(which):
        model = build()
        mp = MixedPrecision(which)
        mp.setup(model)

        def forward():
            with mp.autocast():
                return model(batch)
        with ActivationMeter(model) as meter:
            seen = trace_compute_dtypes(model, forward)
        return meter, seen, model

    plain, _, _ = run(plain_plan)
    lean, seen, model = run(plan)
    norms = [n for n, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    leaned = {r.pattern for r in plan.user_rules if LEAN in r.label}
    assert len(norms) >= 5 and all(seen[n] == {torch.float32} for n in norms)
    assert any(n.startswith("vision") for n in leaned)  # a GroupNorm before a SiLU
    assert lean.total < plain.total


def test_step_memory_reads_the_live_peak_of_a_step_by_kind():
    from vlamp.precision.memory import step_memory

    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
    x = torch.randn(512, 256)
    with ActivationMeter(model) as meter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    live = step_memory(lambda: model(x).sum().backward())
    assert live is not None
    params = sum(p.numel() * 4 for p in model.parameters())
    assert live["peak_by_kind"]["parameters"] == params
    # what the backward needs (the input, the ReLU output) lives at the peak, and more besides
    assert live["added_bytes"] >= meter.total == 512 * 256 * 4 + 512 * 1024 * 4
