"""Defects found by faults, bad input and a close reading: each test failed before its fix.

Nothing lost (trained weights across a change of mode, FP16 overflow of a master), nothing silent
(a plain ``loss.backward()`` in the -true modes, a rule that cannot act, a collapsed loss scale,
running statistics of skipped steps), and bad input answered in one line before work is done.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from vlamp import DynamicLossScaler, MixedPrecision, StaticLossScaler, VlampError
from vlamp.precision.master import MasterWeights
from vlamp.train import checkpoint as checkpoint_module
from vlamp.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from vlamp.train.config_io import load_config
from vlamp.train.step import EMA
from vlamp.train.trainer import Trainer


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vlamp", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def trainer(dataset, out, mode, *more):
    return Trainer(load_config(None, tiny_overrides(dataset, out, mode, *more)), progress=False)


# -- 1. a change of mode on resume keeps the trained weights --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("bf16-true", "fp16-true"), ("fp32", "bf16-true"),
                                           ("bf16-true", "bf16-mixed")])
def test_resume_in_another_mode_starts_from_the_trained_weights(tiny_dataset, tmp_path, saved, resumed):
    out = tmp_path / "run"
    trainer(tiny_dataset, out, saved, "train.steps=3").fit()
    c = latest_checkpoint(out)
    masters = {k.removeprefix("master."): v for k, v in c.train.items() if k.startswith("master.")}
    exact = {**c.model, **masters}  # the trained weights at full precision
    with pytest.warns(UserWarning, match=f"resuming a {saved} run in {resumed}"):
        t = trainer(tiny_dataset, out, resumed, "train.steps=4", "resume=true")
    if isinstance(t.mp.weights, MasterWeights):  # the optimizer will update these: they must be the trained ones
        for name, m in t.mp.master_weights().items():
            if name in masters or saved == "fp32":
                assert torch.equal(m.float(), exact[name].float()), name
    for name, p in t.model.named_parameters():  # and the model holds them, rounded to its storage
        assert torch.equal(p.detach(), exact[name].to(p.dtype)), name
    w3 = {n: p.detach().float().clone() for n, p in t.model.named_parameters()}
    t.fit()
    moved = max(float((p.detach().float() - w3[n]).abs().max()) for n, p in t.model.named_parameters())
    assert moved < 0.05  # one step on from step 3, not a jump back towards the initial weights


# -- 2. a plain loss.backward() in the -true modes is refused, not a silent no-op -----------------
def test_plain_backward_in_a_true_mode_is_refused():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-true")
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.randn(3, 4)).float().sum()
    loss.backward()
    with pytest.raises(VlampError, match=r"plain loss.backward\(\).*mp.backward\(loss\)"):
        mp.step(opt)


# -- 3. a rule on a module that never runs its own forward is said ---------------------------------
def test_rule_on_a_module_used_only_by_its_weights_is_flagged():
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-mixed", {"self_attn.out_proj": "fp32", "linear1": "fp32"})
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.randn(2, 5, 16)).float().sum()
    mp.backward(loss)
    with pytest.warns(UserWarning, match=r"1 ruled module\(s\) never ran.*self_attn.out_proj"):
        mp.step(opt)
    rows = {r["module"]: r["rule"] for r in mp.describe().to_dicts()}
    assert rows["self_attn.out_proj"].endswith("(never ran: storage only)")
    assert rows["linear1"] == "linear1"  # a rule that acts is not marked


# -- 4. an FP16 weight never becomes inf silently ----------------------------------------------------
def test_fp16_true_master_beyond_fp16_range_is_an_error_naming_the_parameter():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e5)
    mp = MixedPrecision("fp16-true", scaler=StaticLossScaler(1.0), builtin_rules=False)
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.ones(1, 2)).float().sum()  # gradients of 1: the step moves weights by 1e5
    mp.backward(loss)
    with pytest.raises(VlampError, match=r"weight: its FP32 master reached .* beyond FP16's largest"):
        mp.step(opt)


# -- 5. the EMA of a -true run averages the masters --------------------------------------------------
def test_ema_in_true_modes_averages_the_fp32_masters():
    def run(source):
        model = nn.Linear(64, 1, bias=False)
        nn.init.ones_(model.weight)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        mp = MixedPrecision("bf16-true", builtin_rules=False)
        mp.setup(model, opt)
        ema = EMA(model, 0.5, mp.master_weights if source else None)
        for _ in range(10):
            with mp.autocast():
                loss = model(torch.ones(1, 64)).float().sum()  # gradient 1: each step -1e-4
            mp.backward(loss)
            mp.step(opt)
            ema.update()
        return float(model.weight.detach().float().mean()), float(ema.shadow[0].mean())

    weight, rounded_average = run(source=False)
    assert weight == 1.0 and rounded_average == 1.0  # 10 x 1e-4 still rounds to 1.0 in bf16
    _, master_average = run(source=True)
    # the masters went 1 - k * 1e-4; their average lags one step behind: 0.999 + 1e-4
    assert master_average == pytest.approx(1.0 - 10e-4 + 1e-4, abs=2e-6)


# -- 6. a skipped step leaves running statistics alone ------------------------------------------------
def test_skipped_step_restores_batchnorm_running_statistics():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-mixed")
    mp.setup(model, opt)
    for bad in (False, True, False):
        before = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
        x = torch.randn(8, 4)
        if bad:
            x[0, 0] = float("nan")
        with mp.autocast():
            loss = model(x).float().mean()
        mp.backward(loss)
        out = mp.step(opt, clip_grad_norm=1.0)
        assert out.skipped == bad
        same = torch.equal(model[1].running_mean, before[0]) and \
            torch.equal(model[1].num_batches_tracked, before[1])
        assert same == bad  # a skipped step changed nothing; a good one moved the statistics
    assert torch.isfinite(model[1].running_mean).all()


# -- 7. a collapsed loss scale is said every time; the scaler's settings are configurable -----------
def test_collapsed_scale_with_all_zero_gradients_warns_each_time_it_starts():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=2.0**-40, growth_interval=1)
    mp = MixedPrecision("fp16-mixed", scaler=scaler, builtin_rules=False)
    mp.setup(model, opt)
    x = torch.randn(8, 4)

    def step():
        with mp.autocast():
            loss = model(x).float().mean()  # times 2^-40: every fp16 gradient flushes to zero
        mp.backward(loss)
        return mp.step(opt)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(), step()                      # one collapse: said once
        scaler._scale = 2.0**10             # recovered
        step()
        scaler._scale = 2.0**-40            # collapsed again: said again
        step()
    said = [w for w in caught if "all-zero gradients" in str(w.message)]
    assert len(said) == 2 and mp.zero_grad_steps == 3


def test_min_scale_warning_comes_back_after_recovery():
    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0, growth_interval=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for found in (True, True, True, False, True, True):
            s.update(found_inf=found)
    assert sum("at min_scale" in str(w.message) for w in caught) == 2


@pytest.mark.slow
def test_scaler_settings_come_from_the_config(tiny_dataset, tmp_path):
    t = trainer(tiny_dataset, tmp_path / "r", "fp16-mixed", "precision.loss_scale.min_scale=1",
                "precision.loss_scale.init_scale=1024", "precision.loss_scale.hysteresis=2")
    s = t.mp.scalers[0]
    assert (type(s).__name__, s.min_scale, s.scale, s.hysteresis) == ("DynamicLossScaler", 1.0, 1024.0, 2)
    p = cli("train", "precision.loss_scale.min_scal=1")
    assert p.returncode == 2 and "did you mean 'precision.loss_scale.min_scale'" in p.stderr


# -- 8-12. bad input: one line, exit 2, before work is done; nothing surprising ----------------------
@pytest.mark.slow
def test_unwritable_output_dir_is_one_line_before_loading(tiny_dataset, tmp_path):
    for out in ("/proc/vlamp-x", str(tmp_path / "file" / "run")):
        (tmp_path / "file").write_text("a regular file")
        p = cli("train", f"dataset.path={tmp_path / 'no-such-dataset'}", f"output_dir={out}")
        # the dataset path is bad too: the output directory is checked first, before any loading
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert f"output_dir {out!r} cannot be written" in p.stderr


@pytest.mark.slow
def test_writers_of_one_file_at_once_each_rename_a_whole_file(tmp_path):
    """A benchmark's runs load side by side and record the same decoded-frames store and plan
    cache: with one shared temporary name, a writer renamed the file another had just renamed
    (FileNotFoundError, 3 of 4 threads here). Each writer now has its own."""
    import threading

    from vlamp.io import write_text_atomic
    from vlamp.precision.plan import PrecisionPlan

    plan = PrecisionPlan("bf16-mixed")
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(200):
                write_text_atomic(tmp_path / "x.json", f"writer {i}\n" * 100)
                plan.save(tmp_path / "plan.yaml")
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(f.name for f in tmp_path.iterdir()) == ["plan.yaml", "x.json"]  # no leftovers
    assert len(set((tmp_path / "x.json").read_text().splitlines())) == 1  # one writer's, whole
    assert PrecisionPlan.load(tmp_path / "plan.yaml").mode.name == "bf16-mixed"


def test_checkpoint_that_passes_its_checksum_but_lacks_keys(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer(tiny_dataset, out, "fp32").fit()  # checkpoints at steps 3 and 6
    step6 = out / "checkpoints" / "step_0000006"
    state = json.loads((step6 / "state.json").read_text())
    del state["tokenizer"], state["numpy_rng"]
    (step6 / "state.json").write_text(json.dumps(state))
    sums = json.loads((step6 / "checksums.json").read_text())
    sums["state.json"] = hashlib.sha256((step6 / "state.json").read_bytes()).hexdigest()
    (step6 / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="lacks tokenizer, numpy_rng"):
        load_checkpoint(step6)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(out).step == 3  # falls back to the previous one
    # checksummed bytes that do not parse are the user's problem; a bug of the reader is not
    step3 = out / "checkpoints" / "step_0000003"
    (step3 / "model.safetensors").write_bytes(b"not a safetensors file")
    sums = json.loads((step3 / "checksums.json").read_text())
    sums["model.safetensors"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (step3 / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(step3)
    monkeypatch.setattr(checkpoint_module, "load", lambda blob: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        load_checkpoint(step6)
    monkeypatch.undo()
    shutil.rmtree(out / "checkpoints" / "step_0000003")
    p = cli("eval", "--checkpoint", str(out), "--episodes", "1")
    assert p.returncode == 2 and "lacks tokenizer" in p.stderr
    assert "Traceback" not in p.stderr and all(
        line.startswith(("warning: ", "vlamp eval: error: ")) for line in p.stderr.strip().splitlines())


@pytest.mark.slow
def test_fresh_run_into_a_directory_with_old_logs_is_refused(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    trainer(tiny_dataset, out, "fp32").fit()
    shutil.rmtree(out / "checkpoints")
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(VlampError, match="holds an earlier run's metrics.jsonl, tb, config.yaml"):
        trainer(tiny_dataset, out, "fp32", "train.lr=0.5")
    assert (out / "config.yaml").read_text() == config_before  # nothing overwritten


def test_generate_into_an_unwritable_place_fails_before_simulating():
    p = cli("data", "generate", "--tasks", "drawer-open", "--episodes-per-task", "1",
            "--out", "/proc/vlamp-dataset")
    assert p.returncode == 2 and "cannot write to '/proc'" in p.stderr
    assert "generate:" not in p.stderr  # no progress bar: nothing was simulated


@pytest.mark.slow
def test_resumed_run_says_how_many_steps_it_trained(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    trainer(tiny_dataset, out, "fp32").fit()
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    p = cli("train", *tiny_overrides(tiny_dataset, out, "fp32", "resume=true"), "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "trained 3 steps (steps 4-6)" in p.stdout and "resumed at step 3" in p.stdout
    assert all(line.startswith("warning: ") or re.match(r"step \d+/6: loss", line)  # progress
               for line in p.stderr.strip().splitlines() if line), p.stderr


def test_bad_yaml_rules_file_is_one_line(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules: [{pattern: 'a', policy: fp32\n  - oops")
    p = cli("plan", "--rules", str(bad))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "not valid YAML" in p.stderr


def test_saved_masters_are_keyed_by_parameter_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-true", builtin_rules=False)
    mp.setup(model, opt)
    assert set(mp.state_dict()["master_weights"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
