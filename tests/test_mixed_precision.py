import pytest
import torch
from torch import nn

from vlamp import DynamicLossScaler, MixedPrecision, StaticLossScaler, VlampError
from vlamp.precision.master import MasterWeights
from vlamp.precision.hardware import Hardware, choose_mode


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))


def test_clipping_sees_unscaled_gradients():
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    ref = tiny()
    nn.functional.mse_loss(ref(x), y).backward()
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()

    # fp16-mixed with a static scale of 1024, run without autocast so the numbers are fp32's
    mp16 = MixedPrecision("fp16-mixed", scaler=StaticLossScaler(1024.0), builtin_rules=False)
    model16 = tiny()
    opt16 = torch.optim.SGD(model16.parameters(), lr=1.0)
    mp16.setup(model16, opt16)
    before = [p.detach().clone() for p in model16.parameters()]
    mp16.backward(nn.functional.mse_loss(model16(x), y))  # fp32 forward, loss scaled by 1024
    grads = [p.grad.clone() / 1024.0 for p in model16.parameters()]
    out = mp16.step(opt16, clip_grad_norm=0.1)
    assert out.grad_norm == pytest.approx(true_norm, rel=1e-5)  # not 1024x
    assert out.scale == 1024.0 and not out.skipped
    # the update is the unscaled gradient clipped to norm 0.1
    coef = 0.1 / (true_norm + 1e-6)
    for b, p, g in zip(before, model16.parameters(), grads):
        torch.testing.assert_close(b - p.detach(), g * coef, rtol=1e-4, atol=1e-7)


def test_inf_step_is_skipped_and_scale_backs_off():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("fp16-mixed", scaler=DynamicLossScaler(init_scale=256.0))
    mp.setup(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(2, 4)).sum() * float("inf")
    mp.backward(loss)
    out = mp.step(opt, clip_grad_norm=1.0)
    assert out.skipped and out.found_inf and out.scale == 256.0
    assert mp.scale == 128.0 and mp.skipped_steps == 1
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_bf16_nan_steps_are_skipped_without_a_scaler():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-mixed")
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.randn(2, 4)).float().sum() * float("nan")
    mp.backward(loss)
    assert mp.step(opt).skipped  # no clipping: the fused check catches it
    with mp.autocast():
        loss = model(torch.randn(2, 4)).float().sum() * float("nan")
    mp.backward(loss)
    assert mp.step(opt, clip_grad_norm=1.0).skipped  # with clipping: the norm catches it
    with mp.autocast():
        loss = model(torch.randn(2, 4)).float().sum()
    mp.backward(loss)
    assert not mp.step(opt).skipped
    assert (mp.steps, mp.skipped_steps) == (3, 2)


def test_master_weights_keep_updates_bf16_would_round_away():
    w0 = torch.ones(64)
    for mode, expect_moved in [("bf16-true", True), ("bf16-mixed", True)]:
        model = nn.Linear(64, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(w0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        mp = MixedPrecision(mode, builtin_rules=False)
        mp.setup(model, opt)
        for _ in range(100):
            with mp.autocast():
                loss = model(torch.ones(1, 64)).float().sum()  # grad 1 per weight: -1e-4 per step
            mp.backward(loss)
            mp.step(opt)
        # 100 updates of 1e-4 (each far below bf16's 2^-8 spacing near 1) add up to 0.01
        master = mp.weights.masters[0] if isinstance(mp.weights, MasterWeights) else model.weight
        assert master.float().mean().item() == pytest.approx(0.99, abs=1e-4), mode
        assert (model.weight.float().mean().item() < 1.0) == expect_moved
    # Without masters (a plain bf16 tensor updated in place) the same updates are all lost.
    w = torch.ones(64, dtype=torch.bfloat16)
    for _ in range(100):
        w -= 1e-4
    assert w.float().mean().item() == 1.0


def test_gradient_accumulation_in_fp32_masters_keeps_what_bf16_would_round_away():
    # One large micro-batch gradient, then 16 small ones. Summed in bf16 (8 significant bits) the
    # small ones vanish: 1 + 1e-3 == 1. Summed into the FP32 masters they add up.
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mp = MixedPrecision("bf16-true", builtin_rules=False)
    mp.setup(model, opt)
    small = torch.tensor(1e-3, dtype=torch.bfloat16)
    for x in [1.0] + [1e-3] * 16:
        with mp.autocast():
            loss = model(torch.full((1, 1), x)).float().sum()  # d loss / d w = x (in bf16)
        mp.backward(loss)
    grad = mp.weights.masters[0].grad
    assert grad.dtype == torch.float32
    assert grad.item() == pytest.approx(1.0 + 16 * small.item(), rel=1e-6)
    in_bf16 = torch.tensor(1.0, dtype=torch.bfloat16)
    for _ in range(16):
        in_bf16 += small
    assert in_bf16.item() == 1.0  # what accumulating in the storage dtype would have given


def test_several_losses_have_their_own_scales():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("fp16-mixed", scaler=DynamicLossScaler(init_scale=64.0), num_losses=2)
    mp.setup(model, opt)
    x = torch.randn(2, 4)
    mp.backward(model(x).sum(), loss_id=0)
    mp.backward(model(x).sum() * float("inf"), loss_id=1)
    out = mp.step(opt)
    assert out.skipped
    assert [s.scale for s in mp.scalers] == [64.0, 32.0]  # only loss 1 overflowed
    # finite losses: gradients are the unscaled sum of both
    ref = tiny()
    (ref(x).sum() * 3).backward()
    mp.backward(model(x).sum(), loss_id=0)
    mp.backward(model(x).sum() * 2, loss_id=1)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, r in zip(params, ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad)
    assert not mp.step(opt).skipped


def test_state_dict_round_trip_with_master_weights():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("fp16-true", scaler=DynamicLossScaler(init_scale=8.0, growth_interval=1))
    mp.setup(model, opt)
    for _ in range(3):
        with mp.autocast():
            loss = model(torch.randn(2, 4)).float().sum()
        mp.backward(loss)
        mp.step(opt)
    state = mp.state_dict()
    assert state["scalers"][0]["scale"] == 64.0 and state["steps"] == 3
    model2 = tiny(seed=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    mp2 = MixedPrecision("fp16-true")
    mp2.setup(model2, opt2)
    mp2.load_state_dict(state)
    assert mp2.state_dict()["scalers"] == state["scalers"]
    for a, b in zip(mp.weights.masters, mp2.weights.masters):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"mode": "bf16-mixed", "scaler": "dynamic"}, "needs no loss scaler"),
    ({"mode": "fp32", "scaler": StaticLossScaler(8.0)}, "needs no loss scaler"),
    ({"mode": "int8"}, "unknown mode 'int8'; legal: fp32, bf16-mixed"),
    ({"mode": "fp16-mixed", "scaler": "sometimes"}, "legal: dynamic, static, none"),
    ({"mode": "fp16-mixed", "num_losses": 0}, "num_losses must be an integer >= 1"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(VlampError, match=fragment):
        MixedPrecision(**kwargs)


def test_fp16_without_scaling_warns():
    with pytest.warns(UserWarning, match="underflow"):
        MixedPrecision("fp16-mixed", scaler="none")


def test_setup_twice_and_stepped_optimizer_are_rejected():
    model = tiny()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 4)).sum().backward()
    opt.step()
    with pytest.raises(VlampError, match="already has state"):
        MixedPrecision("bf16-true").setup(model, opt)
    model = tiny()
    MixedPrecision("bf16-mixed").setup(model)
    with pytest.raises(VlampError, match="already has a precision plan"):
        MixedPrecision("bf16-mixed").setup(model)


@pytest.mark.parametrize(("hw", "mode"), [
    (Hardware("cuda", "H100", (9, 0), ()), "bf16-mixed"),
    (Hardware("cuda", "A100", (8, 0), ()), "bf16-mixed"),
    (Hardware("cuda", "V100", (7, 0), ()), "fp16-mixed"),
    (Hardware("cuda", "T4", (7, 5), ()), "fp16-mixed"),
    (Hardware("cuda", "P100", (6, 0), ()), "fp32"),
    (Hardware("cpu", "EPYC", None, ("avx512_bf16", "avx512f")), "bf16-mixed"),
    (Hardware("cpu", "Xeon", None, ("amx_bf16",)), "bf16-mixed"),
    (Hardware("cpu", "old", None, ("avx2", "f16c", "avx512_fp16")), "fp32"),
])
def test_auto_rule(hw, mode):
    assert choose_mode(hw).mode == mode


def test_auto_on_this_machine_never_picks_fp16():
    mp = MixedPrecision("auto")
    assert mp.requested_mode == "auto"
    assert "fp16" not in mp.mode.name


def test_accumulate_casts_each_weight_once_per_step_with_the_same_gradients():
    import contextlib

    from vlamp.precision.verify import count_casts

    micro = [torch.randn(8, 4) for _ in range(3)]

    def grads_and_casts(accumulate):
        model = tiny()
        mp = MixedPrecision("bf16-mixed", builtin_rules=False)
        mp.setup(model)

        def step():
            with mp.accumulate() if accumulate else contextlib.nullcontext():
                for x in micro:
                    with mp.autocast():
                        loss = model(x).float().square().mean()
                    mp.backward(loss / len(micro))

        casts = count_casts(step)
        return [p.grad for p in model.parameters()], casts

    plain, plain_casts = grads_and_casts(False)
    reused, reused_casts = grads_and_casts(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))
    # the 4 weights and biases are cast down once per step instead of once per micro-batch
    assert plain_casts - reused_casts == 4 * (len(micro) - 1), (plain_casts, reused_casts)


def test_boundaries_keep_the_type_of_what_a_module_returns():
    """A ruled module's floating outputs are cast to its policy's output dtype wherever they sit,
    and the container keeps its type: a namedtuple, an OrderedDict subclass with attribute access
    (as Hugging Face's ModelOutput is), a dataclass; other values pass through untouched."""
    import collections
    import dataclasses as dc

    Pair = collections.namedtuple("Pair", "a b")

    class Output(collections.OrderedDict):
        def __getattr__(self, name):
            return self[name]

    @dc.dataclass
    class Record:
        hidden: torch.Tensor
        steps: int = 3

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return Pair(y, [y, {"z": y}]), Output(last=y, ids=torch.arange(3)), Record(y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Head()

        def forward(self, x):
            return self.head(x)

    net = Net()
    MixedPrecision("bf16-mixed", {"head": "params=fp32,compute=fp32,output=bf16"}).setup(net)
    pair, out, record = net(torch.randn(2, 4))
    assert type(pair) is Pair and pair.a.dtype == pair.b[0].dtype == pair.b[1]["z"].dtype == torch.bfloat16
    assert type(out) is Output and out.last.dtype == torch.bfloat16 and out.ids.dtype == torch.int64
    assert type(record) is Record and record.hidden.dtype == torch.bfloat16 and record.steps == 3
