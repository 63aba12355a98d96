"""The real thing on a CUDA device: what the CPU tests check with stand-ins (a model moved after
setup, fused in-kernel unscaling, training, the bench's GPU fields). Skipped without CUDA; run by
``scripts/gpu_check.sh`` on the GPU machine."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from vlamp import MixedPrecision, choose_mode, detect, set_tf32
from vlamp.precision.verify import trace_compute_dtypes
from vlamp.train.config_io import load_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.out = nn.Linear(128, 4)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).float().square().mean()


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true", "fp16-mixed"])
def test_set_up_on_cpu_then_moved_to_cuda(mode):
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    mp = MixedPrecision(mode)
    mp.setup(model, opt)
    model.cuda()  # after setup, before the first step
    x = torch.randn(32, 64, device="cuda")

    def step():
        with mp.autocast():
            loss = model(x)
        mp.backward(loss)

    seen = trace_compute_dtypes(model, step)
    low = torch.float16 if mode.startswith("fp16") else torch.bfloat16
    assert mp.device_type == "cuda"
    assert seen["inp"] == {low} and seen["norm"] == {torch.float32}
    before = [p.detach().clone() for p in model.parameters()]
    assert not mp.step(opt).skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for group in opt.param_groups:  # masters (bf16-true) and optimizer state live on the GPU
        for p in group["params"]:
            assert p.device.type == "cuda" and p.dtype == torch.float32
            assert all(t.device.type == "cuda" for t in opt.state[p].values() if isinstance(t, torch.Tensor))


def test_auto_decides_by_compute_capability():
    hw = detect("cuda")
    major = hw.cuda_capability[0]
    expected = "bf16-mixed" if major >= 8 else "fp16-mixed" if major == 7 else "fp32"
    assert choose_mode(hw).mode == expected
    assert MixedPrecision("auto", device="cuda").mode.name == expected


def test_tf32_switch_changes_fp32_matmuls():
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    exact = (a.double() @ b.double()).float()
    try:
        set_tf32(False)
        ieee = (a @ b - exact).abs().max()
        set_tf32(True)
        tf32 = (a @ b - exact).abs().max()
    finally:
        set_tf32(False)
    assert tf32 > 10 * ieee


def test_fused_in_kernel_unscaling_on_cuda():
    def run(clip):
        torch.manual_seed(0)
        model = Net().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        mp = MixedPrecision("fp16-mixed", scaler="static", scaler_settings={"init_scale": 1024.0})
        mp.setup(model, opt)
        g = torch.Generator("cuda").manual_seed(1)
        for _ in range(3):
            with mp.autocast():
                loss = model(torch.randn(32, 64, device="cuda", generator=g))
            mp.backward(loss)
            mp.step(opt, clip_grad_norm=clip)
        return model

    for a, b in zip(run(None).parameters(), run(1e9).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_trains_and_resumes_on_cuda(tiny_dataset, tmp_path):
    from conftest import tiny_overrides

    from vlamp.train.trainer import Trainer

    def config(out, *more):
        return load_config(None, tiny_overrides(tiny_dataset, out, "bf16-mixed", "train.device=cuda",
                                                *more))

    full = Trainer(config(tmp_path / "full"), progress=False)
    assert next(full.model.parameters()).device.type == "cuda"
    losses = full.fit().losses
    assert all(torch.isfinite(torch.tensor(losses)))
    Trainer(config(tmp_path / "again", "train.steps=3"), progress=False).fit()
    again = Trainer(config(tmp_path / "again", "resume=true"), progress=False)
    assert again.step == 3
    assert again.fit().losses == pytest.approx(losses[3:], rel=1e-3)


def test_bench_on_cuda_reports_gpu_memory(tiny_dataset, tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "-m", "vlamp", "bench", "--quick", "--modes", "bf16-mixed",
                        "--steps", "4", "--warmup", "1", "--episodes", "0", "--out", str(out),
                        "--no-progress", "train.device=cuda"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["machine"]["gpu"] and r["machine"]["cuda_capability"]
    for run in r["runs"]:
        assert run["device"].startswith("cuda") and run["gpu_peak_bytes"] > 0
        assert run["gpu_memory_vs_fp32"] > 0
    assert "peak GPU (MiB)" in p.stdout


def test_diagnostics_and_sensitivity_on_cuda():
    """The GPU path of the diagnostics (inf/NaN always counted, no host read per tensor) and of
    the sensitivity measurement; an overflow planted in fp16 is found."""
    from vlamp.precision.sensitivity import measure_sensitivity

    model = Net().cuda()
    with torch.no_grad():
        model.inp.weight.mul_(1e4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mp = MixedPrecision("fp16-mixed", diagnostics="every:1")
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.randn(32, 64, device="cuda") * 10)
    mp.backward(loss)
    mp.step(opt)
    d = mp.last_diagnostics["modules"]
    assert d["inp"]["act_overflow"] > 0 and d["inp"]["act_headroom_bits"] == 0.0
    errors = measure_sensitivity(Net().cuda(), torch.randn(8, 64, device="cuda"), "bf16-mixed")
    assert 0 < errors["inp"]["output_error"] < 0.02


@pytest.mark.parametrize("update", ["kahan", "stochastic"])
def test_low_precision_updates_keep_small_updates_on_cuda(update):
    """The CPU test's setting on the GPU: 100 SGD steps of 1e-4 on BF16 weights at 1.0 reach
    1.01 (naive rounding would leave them at 1.0), and the weights stay on the device."""
    m = nn.Linear(100, 100, bias=False).cuda()
    with torch.no_grad():
        m.weight.fill_(1.0)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    mp = MixedPrecision("bf16-true", update=update)
    mp.setup(m, opt)
    for _ in range(100):
        with mp.autocast():
            loss = (m.weight.float() * -1e-4).sum()
        mp.backward(loss)
        mp.step(opt)
    assert m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cuda"
    assert float(mp.master_weights()["weight"].float().mean()) == pytest.approx(1.01, abs=5e-4)


def test_bf16_storage_and_8bit_moments_on_cuda():
    """bf16-storage computes in fp32 on the GPU too (its weights bf16 on the device), and 8-bit
    moments live on the device beside the weights."""
    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from vlamp import UpdateSettings

    mp = MixedPrecision("bf16-storage", update=UpdateSettings(optimizer_state="8bit"))
    mp.setup(model, opt)
    x = torch.randn(32, 64, device="cuda")

    def step():
        with mp.autocast():
            loss = model(x)
        mp.backward(loss)

    seen = trace_compute_dtypes(model, step, backward=True)
    assert seen["inp"] == seen["out"] == {torch.float32}
    mp.step(opt)
    assert model.inp.weight.dtype == torch.bfloat16 and model.inp.weight.device.type == "cuda"
    codes = [pair[0] for kinds in mp.weights.packed.values() for pair in kinds.values()]
    assert codes and all(c.dtype == torch.uint8 and c.device.type == "cuda" for c in codes)
