"""Per-module numerical health: each detection on a small model with the trouble planted."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import run_main, tiny_overrides
from torch import nn

from vlamp.precision.diagnostics import Diagnostics, parse_every
from vlamp.precision.errors import VlampError
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.train.config_io import load_config
from vlamp.train.trainer import Trainer


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 1))


def one_step(model: nn.Module, mp: MixedPrecision, loss_factor: float = 1.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.randn(64, 16, generator=torch.Generator().manual_seed(1))).float().square().mean()
    mp.backward(loss * loss_factor)
    outcome = mp.step(opt)
    return outcome, mp.last_diagnostics["modules"]


def test_parse_every():
    assert parse_every("off") == parse_every(None) == parse_every(0) == 0
    assert load_config(None, ["precision.diagnostics=off"]).precision.diagnostics in ("off", "False")
    assert parse_every(load_config(None, ["precision.diagnostics=off"]).precision.diagnostics) == 0
    assert parse_every("every:50") == parse_every(50) == 50
    for bad in ("every:0", "every:x", "sometimes", -3):
        with pytest.raises(VlampError, match="must be 'off' or 'every:N'"):
            parse_every(bad)


def test_fp16_without_a_scaler_shows_gradient_underflow_and_the_scaler_removes_it():
    """A loss small enough that its FP16 gradients flush to zero: every fp16 module's incoming
    gradient is zero or subnormal; with the dynamic scaler (2^16) they are normal again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 without a scaler says it will underflow: it does
        _, bare = one_step(mlp(), MixedPrecision("fp16-mixed", scaler="none", diagnostics="every:1"), 1e-4)
    _, scaled = one_step(mlp(), MixedPrecision("fp16-mixed", diagnostics="every:1"), 1e-4)
    fp16_layers = ["0", "2", "4"]
    assert all(bare[m]["grad_underflow"] > 0.95 for m in fp16_layers), bare
    assert all(scaled[m]["grad_underflow"] < 0.05 for m in fp16_layers), scaled
    assert all(scaled[m]["grad_overflow"] == 0 for m in scaled)


def test_a_planted_overflow_is_named_and_healthy_modules_keep_headroom():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e5)  # its FP16 output passes 65504
    outcome, d = one_step(model, MixedPrecision("fp16-mixed", diagnostics="every:1"))
    assert outcome.skipped
    assert d["2"]["act_overflow"] > 0  # the first module whose output holds inf
    assert d["0"]["act_overflow"] == 0 and d["0"]["act_headroom_bits"] > 8  # upstream: healthy
    assert "lost_updates" not in d["0"]  # a skipped step loses no update
    _, healthy = one_step(mlp(), MixedPrecision("fp16-mixed", diagnostics="every:1"))
    assert all(m["act_overflow"] == 0 and m["act_headroom_bits"] > 8 for m in healthy.values())


def test_naive_bf16_updates_are_lost_and_fp32_masters_keep_them():
    """Weights of 1.0 and updates of about 1e-4: below half a bf16 ulp of 1.0 (2^-9), far above
    fp32's. A bf16 weight updated in place does not move; its FP32 master does."""
    def model() -> nn.Linear:
        m = nn.Linear(32, 32)
        nn.init.constant_(m.weight, 1.0)
        return m

    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    naive = model().to(torch.bfloat16)
    opt = torch.optim.SGD(naive.parameters(), lr=1e-3)
    diag = Diagnostics(every=1)
    diag.attach(naive)
    diag.begin(1)
    (naive(x.bfloat16()).float().mean() * 10).backward()
    diag.before_update(opt)
    opt.step()
    diag.after_update(opt)
    lost_naive = diag.end()["modules"]["(root)"]["lost_updates"]

    master = model()
    opt = torch.optim.SGD(master.parameters(), lr=1e-3)
    mp = MixedPrecision("bf16-true", diagnostics="every:1")
    mp.setup(master, opt)
    with mp.autocast():
        loss = master(x).float().mean() * 10
    mp.backward(loss)
    mp.step(opt)
    assert lost_naive > 0.95
    assert mp.last_diagnostics["modules"]["(root)"]["lost_updates"] == 0.0


def test_only_sampled_steps_are_recorded_and_a_run_logs_them(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-mixed", "precision.diagnostics=every:2"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == [1, 2, 4, 6]
    modules = diag[0]["modules"]
    assert {"trunk.0.qkv", "trunk.0.norm1", "action_out", "loss_fn"} <= set(modules)
    assert set(modules["trunk.0.qkv"]) == {"act_overflow", "act_underflow", "act_headroom_bits",
                                           "grad_overflow", "grad_underflow", "grad_headroom_bits",
                                           "lost_updates"}
    # Headroom is judged in each module's compute dtype: bf16's and fp32's range are the same
    # (8-bit exponent), so a bf16 layer and its FP32 norm both have over 100 bits.
    assert modules["trunk.0.qkv"]["act_headroom_bits"] > 100
    # Zeros in bf16 gradients (padding tokens, masked positions) are zeros in fp32 too: counted,
    # but never a finding, nor advice to keep a bf16 layer in fp32
    from vlamp.train.diagnose import read, risks

    zeros = [m for m, v in modules.items() if (v.get("grad_underflow") or 0) > 0.10]
    assert zeros, "the padded text layers of this run receive mostly-zero gradients"
    assert not any("zero or subnormal" in f for r in risks(read(out)) for f in r.findings)
    assert any(f.name.startswith("events") for f in (out / "tb").iterdir())


def test_vlamp_diagnose_names_the_modules_at_risk_first(tiny_dataset, tmp_path, capsys):
    """FP16 without a scaler on a tiny TinyVLA: the report ranks the fp16 layers whose gradients
    flush to zero, says what to do, draws the heatmaps; a run without records is one line."""
    import subprocess
    import sys

    from vlamp.train.diagnose import read, risks

    out = tmp_path / "fp16"
    cfg = load_config(None, tiny_overrides(tiny_dataset, out, "fp16-mixed", "precision.scaler=none",
                                           "precision.diagnostics=every:2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(cfg, progress=False).fit()
    found = risks(read(out))
    assert found and all(r.dtype == "fp16" for r in found[:5])
    assert "zero or subnormal in fp16" in found[0].findings[0]
    assert "raise the loss scale" in found[0].advice[0]
    p = subprocess.run([sys.executable, "-m", "vlamp", "diagnose", str(out), "--top", "3"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert found[0].module in p.stdout
    for name in ("report.md", "report.html", "grad_underflow.png", "headroom.png",
                 "lost_updates.png", "loss_scale.png"):
        assert (out / "diagnose" / name).stat().st_size > 0, name
    assert found[0].module in (out / "diagnose" / "report.md").read_text()
    plain = tmp_path / "plain"
    Trainer(load_config(None, tiny_overrides(tiny_dataset, plain, "fp32")), progress=False).fit()
    code, _, err = run_main(capsys, "diagnose", str(plain))
    assert code == 2 and "precision.diagnostics=every:50" in err and "Traceback" not in err
