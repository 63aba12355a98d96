"""Updates of weights stored in low precision without FP32 masters: Kahan compensation and
stochastic rounding keep updates far below BF16's resolution that round-to-nearest loses; the
state they add resumes exactly; the gradient accumulation dtype is the one asked for."""

import shutil

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from vlamp import MixedPrecision, UpdateSettings, VlampError
from vlamp.precision.update import stochastic_round
from vlamp.train.config_io import load_config
from vlamp.train.trainer import Trainer

STEP = 1e-4  # per update; a BF16 weight of 1.0 moves only by 2**-8 = 0.0039 or more
# After 100 SGD steps of the BF16 gradient -STEP (1.0014e-4 once rounded to BF16)
EXPECTED = 1.0 + 100 * float(torch.tensor(STEP, dtype=torch.bfloat16))


def tiny_update_run(update, optimizer="sgd", steps=100, grad_accum="fp32"):
    """A 100x100 BF16 weight at 1.0, pushed up by ``STEP`` per step: after 100 steps it
    should be 1.01. Returns the weight the optimizer works on and the stored one (means)."""
    m = nn.Linear(100, 100, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    opt = torch.optim.SGD(m.parameters(), lr=1.0) if optimizer == "sgd" else \
        torch.optim.AdamW(m.parameters(), lr=STEP, weight_decay=0.0)
    mp = MixedPrecision("bf16-true", update=UpdateSettings(update, grad_accum))
    mp.setup(m, opt)
    for _ in range(steps):
        with mp.autocast():
            loss = (m.weight.float() * -STEP).sum()  # gradient -STEP everywhere
        mp.backward(loss)
        mp.step(opt)
    assert m.weight.dtype == torch.bfloat16
    return float(mp.master_weights()["weight"].float().mean()), float(m.weight.detach().float().mean())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_updates_far_below_bf16_resolution_are_kept_by_kahan_and_stochastic_rounding(optimizer):
    naive_exact, naive_stored = tiny_update_run("naive", optimizer)
    assert naive_exact == naive_stored == 1.0  # every update rounded away
    kahan_exact, kahan_stored = tiny_update_run("kahan", optimizer)
    assert kahan_exact == pytest.approx(1.01, abs=5e-4)  # the weight plus its compensation
    assert kahan_stored in (1.0078125, 1.015625)  # the stored weight moved by whole BF16 steps
    sr_exact, sr_stored = tiny_update_run("stochastic", optimizer)
    assert sr_exact == sr_stored == pytest.approx(1.01, abs=5e-4)  # right on average
    master_exact, _ = tiny_update_run("master", optimizer)
    assert master_exact == pytest.approx(EXPECTED if optimizer == "sgd" else 1.01, abs=2e-6)


def test_stochastic_rounding_is_exact_on_average_and_only_picks_the_two_neighbours():
    x = torch.full((200_000,), 1.0 + 0.3 * 2**-7)  # 30% of the way from 1 to the next BF16
    r = stochastic_round(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float((r > 1).float().mean()) == pytest.approx(0.3, abs=0.005)
    neg = stochastic_round(-x, torch.Generator().manual_seed(0)).float()
    assert torch.equal(neg, -r)  # magnitudes, sign untouched
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0 * 2**-100])  # already BF16 values: unchanged
    assert torch.equal(stochastic_round(exact).float(), exact)


def test_optimizer_state_bytes_per_parameter_by_update_method():
    def held(update):
        m = nn.Linear(64, 64, bias=False)
        opt = torch.optim.AdamW(m.parameters())
        mp = MixedPrecision("bf16-true", update=update)
        mp.setup(m, opt)
        with mp.autocast():
            loss = m(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().mean()
        mp.backward(loss)
        mp.step(opt)
        moments = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for k, t in st.items() if k != "step")
        extra = sum(t.numel() * t.element_size() for k, t in mp.state_dict()["update_tensors"].items()
                    if k.startswith("kahan."))
        masters = sum(t.numel() * t.element_size() for t in mp.state_dict()["master_weights"].values())
        return (moments + extra + masters) / m.weight.numel()
    assert held("master") == 12  # FP32 master + two FP32 moments
    assert held("naive") == held("stochastic") == 4  # two BF16 moments
    assert held("kahan") == 6  # two BF16 moments + a BF16 compensation buffer
    row = {r["module"]: r for r in _describe("stochastic")}["(root)"]
    assert row["B/param"] == 8 and row["optim"] == "bf16"  # weight 2 + gradient 2 + moments 4
    assert {r["module"]: r for r in _describe("master")}["(root)"]["B/param"] == 18


def _describe(update):
    m = nn.Linear(8, 8, bias=False)
    opt = torch.optim.AdamW(m.parameters())
    mp = MixedPrecision("bf16-true", update=update)
    mp.setup(m, opt)
    return mp.describe().to_dicts()


@pytest.mark.parametrize("update", ["kahan", "master"])
def test_gradients_of_micro_batches_are_summed_in_the_dtype_asked_for(update):
    """Two micro-batches with gradients 1 and 2**-9: their BF16 sum rounds to 1, their FP32 sum
    is 1.001953125. SGD with lr 1 from 0: the weight the optimizer holds is minus the sum."""
    def summed(grad_accum):
        w = nn.Parameter(torch.zeros(4))
        opt = torch.optim.SGD([w], lr=1.0)
        holder = nn.Module()
        holder.w = w
        mp = MixedPrecision("bf16-true", update=UpdateSettings(update, grad_accum))
        mp.setup(holder, opt)
        for g in (1.0, 2**-9):
            with mp.autocast():
                loss = (holder.w.float() * g).sum()
            mp.backward(loss)
        mp.step(opt)
        return float(mp.master_weights()["w"][0])
    assert summed("fp32") == -(1 + 2**-9)
    assert summed("storage") == -1.0


def test_bad_update_names_and_modes_without_low_precision_weights_are_refused():
    with pytest.raises(VlampError, match="unknown update .kahn.; legal: auto, master, kahan, stochastic, naive"):
        MixedPrecision("bf16-true", update="kahn")
    with pytest.raises(VlampError, match="unknown grad_accum 'bf16'; legal: fp32, storage"):
        MixedPrecision("bf16-true", update=UpdateSettings(grad_accum="bf16"))
    m = nn.Linear(4, 4)
    with pytest.raises(VlampError, match="stores none"):
        MixedPrecision("bf16-mixed", update="kahan").setup(m, torch.optim.SGD(m.parameters(), lr=0.1))
    m = nn.Linear(4, 4)
    with pytest.raises(VlampError, match="stochastic rounding is for bf16 storage"):
        MixedPrecision("fp16-true", update="stochastic").setup(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(VlampError, match="precision: unknown update"):
        load_config(None, ["precision.update=fast"])


@pytest.mark.slow
@pytest.mark.parametrize("update", ["kahan", "stochastic"])
def test_resume_of_compensation_and_rounding_state_is_bit_exact(tiny_dataset, tmp_path, update):
    """Stop after step 3, resume to 6: the same bytes as the run that did not stop (the Kahan
    buffers and the stochastic-rounding generator are state)."""
    def run(out, *more):
        cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-true",
                                               f"precision.update={update}", *more))
        return Trainer(cfg, progress=False).fit()
    full = tmp_path / "full"
    run(full, "train.grad_accum=2")
    saved = (full / "checkpoints" / "step_0000003" / "train.safetensors").read_bytes()
    assert (b"update.kahan." in saved) == (update == "kahan")
    assert (b"update.generator" in saved) == (update == "stochastic")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000006")
    run(part, "train.grad_accum=2", "resume=true")
    for name in ("model.safetensors", "train.safetensors"):
        a = (full / "checkpoints" / "step_0000006" / name).read_bytes()
        b = (part / "checkpoints" / "step_0000006" / name).read_bytes()
        assert a == b, name


@pytest.mark.slow
def test_a_kahan_run_resumed_with_masters_starts_them_from_w_plus_c(tiny_dataset, tmp_path):
    """Switching the update method on resume keeps what the run had: FP32 masters start from the
    stored bf16 weights plus their Kahan compensation (not from the bf16 weights alone), and a
    switch to stochastic rounding says the compensation is dropped."""
    from vlamp.train.checkpoint import latest_checkpoint
    from vlamp.train.checkpoint import kahan_weights

    out = tmp_path / "run"

    def trainer(update):
        cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-true",
                                               f"precision.update={update}", "resume=true"))
        return Trainer(cfg, progress=False)

    cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-true", "precision.update=kahan"))
    Trainer(cfg, progress=False).fit()
    c = latest_checkpoint(out)
    exact = kahan_weights(c.model, c.train)
    assert exact and any(not torch.equal(exact[k], c.model[k].float()) for k in exact)
    with pytest.warns(UserWarning, match=r"updated by kahan with precision.update=master: the "
                                         r"stored weights plus their Kahan compensation \(w \+ c\) "
                                         r"start the FP32 masters"):
        t = trainer("master")
    masters = t.mp.master_weights()
    assert all(torch.equal(masters[k], exact[k]) for k in exact)
    with pytest.warns(UserWarning, match="what kahan kept below the stored weights' precision is dropped"):
        trainer("stochastic")
