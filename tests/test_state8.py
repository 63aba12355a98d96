"""8-bit optimizer state: the dynamic code, quantization error, training close to FP32 AdamW with
every update method, ~2 bytes per parameter of moments, and a resume that gives the same bits."""

import pytest
import torch
from torch import nn

from vlamp import MixedPrecision, UpdateSettings
from vlamp.precision.memory import state_memory
from vlamp.precision.state8 import BLOCK, dequantize, dynamic_map, quantize


def test_the_dynamic_maps_are_256_sorted_codes_with_zero_and_one():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert signed.numel() == unsigned.numel() == 256
    assert torch.all(signed[1:] > signed[:-1]) and torch.all(unsigned[1:] >= unsigned[:-1])
    assert {0.0, 1.0} <= set(signed.tolist()) and float(signed.min()) < -0.99
    assert float(unsigned.min()) == 0.0 and float(unsigned[1]) < 1e-6  # fine steps near zero


@pytest.mark.parametrize("signed", [True, False])
def test_the_table_lookup_finds_the_nearest_code_as_a_binary_search_does(signed):
    """The codes come from a table of float cells and one comparison; they must be
    ``torch.bucketize``'s on random values, on every midpoint and on its neighbouring floats."""
    from vlamp.precision.state8 import _codes, _midpoints

    mids = _midpoints(signed)
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(1 << 16, generator=g) * 2 - 1,
                        (torch.randn(1 << 16, generator=g) * torch.logspace(-9, 0, 1 << 16)),
                        mids, torch.nextafter(mids, torch.tensor(2.0)),
                        torch.nextafter(mids, torch.tensor(-2.0)), dynamic_map(signed),
                        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])]).clamp(-1, 1)
    values = values if signed else values.abs()
    assert torch.equal(_codes(values, signed), torch.bucketize(values, mids, out_int32=True))


def test_quantization_error_is_within_half_a_code_step_of_each_blocks_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, BLOCK + 17, generator=g) * torch.logspace(-6, 0, 3).unsqueeze(1)
    codes, absmax = quantize(x, signed=True)
    assert codes.dtype == torch.uint8 and absmax.numel() == -(-x.numel() // BLOCK)
    y = dequantize(codes, absmax, True, x)
    assert y.shape == x.shape
    scale = absmax.repeat_interleave(BLOCK)[: x.numel()].view_as(x)
    assert float(((y - x).abs() / scale).max()) < 0.0075  # the widest gap of the map, halved
    v = x.square()  # a second moment: unsigned map, relative precision near zero
    w = dequantize(*quantize(v, signed=False), False, v)
    big = v > 1e-3 * v.max()
    assert float(((w - v).abs() / v)[big].median()) < 0.02


def run(mode, update, state, steps=60):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mp = MixedPrecision(mode, builtin_rules=False,
                        update=UpdateSettings(update, optimizer_state=state, seed=1))
    mp.setup(model, opt)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True)).sin()
    losses = []
    for _ in range(steps):
        with mp.autocast():
            loss = (model(x).float() - y).square().mean()
        mp.backward(loss)
        mp.step(opt, clip_grad_norm=1.0)
        losses.append(float(loss.detach()))
    return model, opt, mp, losses


@pytest.mark.parametrize(("mode", "update"), [("fp32", "master"), ("bf16-true", "master"),
                                              ("bf16-true", "kahan"), ("bf16-true", "stochastic"),
                                              ("bf16-storage", "stochastic")])
def test_8bit_moments_train_like_full_precision_ones_with_every_update(mode, update):
    model, opt, mp, low = run(mode, update, "8bit")
    _, _, _, full = run(mode, update, "auto")
    assert low[-1] < 0.3 * low[0]
    assert abs(low[-1] - full[-1]) <= 0.15 * full[-1] + 1e-3, (low[-1], full[-1])
    assert all(set(st) == {"step"} for st in opt.state.values())  # moments live in 8 bits
    n = sum(p.numel() for p in model.parameters())
    held = state_memory(model, opt, mp)["optimizer_bytes"] - sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    assert 2 * n <= held <= 2 * n * (1 + 4 / BLOCK) + 2 * BLOCK * 2 * len(list(model.parameters()))
    rows = {r["module"]: r for r in mp.describe().to_dicts()}
    assert rows["2"]["optim"] == "8bit"


def test_bytes_per_parameter_with_bf16_weights_and_8bit_moments():
    _, _, mp, _ = run("bf16-true", "stochastic", "8bit", steps=1)
    rows = {r["module"]: r for r in mp.describe().to_dicts()}
    assert rows["2"]["B/param"] == pytest.approx(2 + 2 + 2 * (1 + 4 / BLOCK))  # 6.03


@pytest.mark.parametrize(("mode", "update"), [("fp32", "master"), ("bf16-true", "master"),
                                              ("bf16-true", "stochastic")])
def test_a_resume_from_the_state_dict_gives_the_same_bits(mode, update):
    model, opt, mp, _ = run(mode, update, "8bit", steps=5)
    import copy

    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), mp.state_dict()))

    def more(model, opt, mp):
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            x = torch.randn(32, 16, generator=g)
            with mp.autocast():
                loss = model(x).float().square().mean()
            mp.backward(loss)
            mp.step(opt)
        return model.state_dict()

    straight = more(model, opt, mp)
    torch.manual_seed(0)
    again = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    opt2 = torch.optim.AdamW(again.parameters(), lr=3e-3)
    mp2 = MixedPrecision(mode, builtin_rules=False,
                         update=UpdateSettings(update, optimizer_state="8bit", seed=1))
    mp2.setup(again, opt2)
    again.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    mp2.load_state_dict(saved[2])
    assert saved[2]["update_tensors"] and all(k.startswith(("state8.", "generator"))
                                              for k in saved[2]["update_tensors"])
    resumed = more(again, opt2, mp2)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16-true"])  # fp32's plain path: the state-dict test above
def test_the_trainer_checkpoints_8bit_moments_and_resumes_bit_exactly(tiny_dataset, tmp_path, mode):
    from conftest import assert_resume_is_bit_exact, tiny_overrides

    from vlamp.train.config_io import load_config
    from vlamp.train.trainer import Trainer

    def run(out, *more):
        cfg = load_config(None, tiny_overrides(tiny_dataset, out, mode,
                                               "precision.optimizer_state=8bit", *more))
        return Trainer(cfg, progress=False).fit()

    full = tmp_path / "full"
    run(full, "train.grad_accum=2")
    saved = (full / "checkpoints" / "step_0000003" / "train.safetensors").read_bytes()
    assert b"update.state8.trunk.0.qkv.weight.exp_avg_sq.codes" in saved
    assert_resume_is_bit_exact(full, run, "train.grad_accum=2")


def test_bench_labels_name_the_update_and_the_optimizer_state():
    from vlamp import VlampError
    from vlamp.bench.run import parse_modes, split_mode
    from vlamp.precision.weight_update import mode_label

    assert split_mode("bf16-true/stochastic+8bit") == ("bf16-true", "stochastic", "8bit")
    assert split_mode("fp32+8bit") == ("fp32", "auto", "8bit") and split_mode("fp32") == ("fp32", "auto", "auto")
    for label in ("bf16-true/kahan+8bit", "fp32+8bit", "bf16-storage", "bf16-true/naive"):
        assert mode_label(*split_mode(label)) == label
    assert mode_label("bf16-true", "master") == "bf16-true"  # the -true modes' own update
    assert mode_label("bf16-storage", "master") == "bf16-storage/master"
    modes, _ = parse_modes("fp32+8bit,bf16-storage+8bit", device="cpu")
    assert modes == ["fp32", "fp32+8bit", "bf16-storage+8bit"]
    with pytest.raises(VlampError, match="the optimizer state after the plus is one of auto, 8bit"):
        parse_modes("bf16-true+4bit", device="cpu")


def _trained(mode, update, state, bucket):
    """Three steps of two micro-batches on an embedding and a linear layer larger than a small
    bucket; the weights, the method's tensors and the optimizer's state after them."""
    from torch import nn

    from vlamp.precision.mixed_precision import MixedPrecision
    from vlamp.precision.weight_update import UpdateSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 40), nn.Linear(40, 70), nn.LayerNorm(70))
    mp = MixedPrecision(mode, update=UpdateSettings(update, optimizer_state=state))
    mp.setup(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    mp.setup(model, opt)
    mp.weights.bucket = bucket
    if hasattr(mp.weights, "buckets"):
        mp.weights.buckets = mp.weights._buckets(opt, lift_all=mp.weights.state8)
    largest, inner = [], opt.step

    def step(*args, **kwargs):  # the most elements one optimizer call works on
        largest.append(max(p.numel() for group in opt.param_groups for p in group["params"]))
        return inner(*args, **kwargs)
    opt.step = step
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _ in range(2):
            with mp.autocast():
                loss = model(torch.randint(0, 300, (8, 5), generator=g)).float().pow(2).mean()
            mp.backward(loss / 2)
        mp.step(opt)
    optim = {(i, k): v.clone() for i, p in enumerate(opt.param_groups[0]["params"])
             for k, v in opt.state[p].items()}
    return {**model.state_dict(), **mp.weights.state_dict(), **mp.weights.masters_state()}, optim, \
        max(largest)


@pytest.mark.parametrize("mode,update,state", [
    ("bf16-true", "naive", "auto"), ("bf16-true", "kahan", "auto"),
    ("bf16-true", "stochastic", "auto"), ("bf16-true", "stochastic", "8bit"),
    ("fp32", "auto", "8bit"), ("bf16-true", "master", "8bit"), ("bf16-storage", "kahan", "8bit")])
def test_a_parameter_larger_than_a_bucket_is_stepped_in_slices_to_the_same_bits(mode, update, state):
    whole, whole_optim, _ = _trained(mode, update, state, bucket=1 << 20)
    sliced, sliced_optim, largest = _trained(mode, update, state, bucket=1024)  # 12,000 and 2,800
    assert largest <= 1024  # no FP32 copy of more than a bucket at once
    assert whole.keys() == sliced.keys() and whole_optim.keys() == sliced_optim.keys()
    for k in whole:
        assert torch.equal(whole[k], sliced[k]), k
    for k in whole_optim:
        assert torch.equal(whole_optim[k], sliced_optim[k]), k


def _three_steps(mode, update, state, in_backward, micro=1, clip=None):
    from torch import nn

    from vlamp.precision.mixed_precision import MixedPrecision
    from vlamp.precision.weight_update import UpdateSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 40), nn.Linear(40, 70), nn.LayerNorm(70))
    mp = MixedPrecision(mode, update=UpdateSettings(update, optimizer_state=state,
                                                    in_backward=in_backward))
    mp.setup(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    mp.setup(model, opt)
    g = torch.Generator().manual_seed(1)
    held = []
    for _ in range(3):
        for _ in range(micro):
            with mp.autocast():
                loss = model(torch.randint(0, 300, (8, 5), generator=g)).float().pow(2).mean()
            mp.backward(loss / micro)
            held.append(sum(p.grad is not None for p in model.parameters()))
        mp.step(opt, clip_grad_norm=clip)
    return model.state_dict(), held


@pytest.mark.parametrize("mode,update,state", [
    ("fp32", "auto", "auto"), ("fp32", "auto", "8bit"), ("bf16-true", "kahan", "auto"),
    ("bf16-storage", "naive", "8bit")])
def test_the_step_in_the_backward_gives_the_same_bits_and_holds_no_gradient(mode, update, state):
    after, _ = _three_steps(mode, update, state, in_backward=False)
    inside, held = _three_steps(mode, update, state, in_backward=True)
    assert held == [0, 0, 0]  # each gradient freed as soon as its weight was stepped
    for k in after:
        assert torch.equal(after[k], inside[k]), k


def test_the_step_in_the_backward_with_stochastic_rounding_draws_in_another_order():
    after, _ = _three_steps("bf16-storage", "stochastic", "8bit", in_backward=False)
    inside, _ = _three_steps("bf16-storage", "stochastic", "8bit", in_backward=True)
    for k in after:  # the weights are stepped in the backward's order: other draws, same scale
        torch.testing.assert_close(after[k].float(), inside[k].float(), rtol=0.02, atol=0.02)


def test_the_step_in_the_backward_refuses_what_needs_every_gradient_first():
    from vlamp.precision.errors import VlampError

    with pytest.raises(VlampError, match="loss scaler"):
        _three_steps("fp16-mixed", "auto", "auto", in_backward=True)
    with pytest.raises(VlampError, match="kahan, stochastic or naive"):
        _three_steps("bf16-true", "master", "auto", in_backward=True)
    with pytest.raises(VlampError, match="clip_grad_norm=0"):
        _three_steps("fp32", "auto", "auto", in_backward=True, clip=1.0)
    with pytest.raises(VlampError, match="grad_accum=1"):
        _three_steps("fp32", "auto", "auto", in_backward=True, micro=2)
