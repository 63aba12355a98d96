"""Device plumbing: the device names, MixedPrecision following a model that moved after setup
(the meta device stands in for a GPU where there is none: a model built there and moved to the CPU
must compute with CPU autocast and carry its FP32 masters along), the fused optimizers' in-kernel
unscaling, model size presets, and the errors for devices this machine lacks."""

import pytest
import torch
from conftest import run_main
from torch import nn

from vlamp import MixedPrecision, VlampError, choose_mode, detect, resolve_device
from vlamp.precision.scaler import unscales_itself
from vlamp.precision.verify import trace_compute_dtypes
from vlamp.train.config_io import load_config

NO_CUDA = not torch.cuda.is_available()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).float().square().mean()


def test_device_names():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("tpu", "cpu:1", "gpu", "cuda:x"):
        with pytest.raises(VlampError, match="not one of auto, cpu, cuda, cuda:N"):
            resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_so():
    with pytest.raises(VlampError, match="no CUDA device.*use device=cpu or auto"):
        resolve_device("cuda:0")


@pytest.mark.slow
def test_train_with_a_bad_device_exits_2_with_one_line(tmp_path, capsys):
    cases = [("train.device=tpu", "train.device must be one of auto, cpu, cuda, cuda:N")]
    if NO_CUDA:
        cases.append(("train.device=cuda", "no CUDA device"))
    for override, message in cases:
        code, _, err = run_main(capsys, "train", override, f"output_dir={tmp_path / 'run'}")
        assert code == 2 and message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_autocast_follows_a_model_moved_after_setup(mode):
    model = Net().to("meta")  # set up where it will not run (a GPU's stand-in) ...
    mp = MixedPrecision(mode)
    mp.setup(model)
    assert mp.device_type == "meta"
    model.to_empty(device="cpu")  # ... then moved and given weights
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(4, 8)

    def forward():
        with mp.autocast():
            model(x)

    seen = trace_compute_dtypes(model, forward)  # CPU autocast, not the meta device's
    assert mp.device_type == "cpu"
    assert seen["inp"] == {torch.bfloat16} and seen["norm"] == {torch.float32}


def test_masters_live_on_their_parameters_device():
    model = Net().to("meta")  # a device that is not the CPU, where the masters must not land
    opt = torch.optim.AdamW(model.parameters())
    MixedPrecision("bf16-true").setup(model, opt)
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert all(m.device.type == "meta" and m.dtype == torch.float32 for m in masters)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.ndim > 1)


def test_a_move_that_replaces_parameters_is_refused():
    model = Net().to("meta")
    opt = torch.optim.AdamW(model.parameters())
    mp = MixedPrecision("bf16-mixed")
    mp.setup(model, opt)
    model.to_empty(device="cpu")  # new Parameter objects: the optimizer holds the old ones
    with pytest.raises(VlampError, match="replaced its parameters.*Move the model first"):
        with mp.autocast():
            pass


def test_moving_after_the_optimizer_stepped_is_refused():
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    mp = MixedPrecision("bf16-true")
    mp.setup(model, opt)
    with mp.autocast():
        loss = model(torch.randn(4, 8))
    mp.backward(loss)
    mp.step(opt)
    model.to("meta")
    with pytest.raises(VlampError, match="moved from cpu to meta after its optimizer had stepped"):
        with mp.autocast():
            pass


def test_auto_decides_for_the_device_it_is_given():
    assert MixedPrecision("auto", device="cpu").mode.name == choose_mode(detect("cpu")).mode


def _fp16_run(fused: bool, clip: float | None, poison_step: int | None = None):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=not fused)
    mp = MixedPrecision("fp16-mixed", scaler="static", scaler_settings={"init_scale": 1024.0})
    mp.setup(model, opt)
    g = torch.Generator().manual_seed(1)
    outcomes = []
    for i in range(4):
        with mp.autocast():
            loss = model(torch.randn(8, 8, generator=g))
        mp.backward(loss)
        if i == poison_step:
            model.out.bias.grad.fill_(float("inf"))
        outcomes.append(mp.step(opt, clip_grad_norm=clip))
    return model, opt, outcomes


def test_fused_optimizer_unscales_in_its_kernel_with_the_same_result():
    assert unscales_itself(torch.optim.AdamW(Net().parameters(), fused=True))
    assert not unscales_itself(torch.optim.AdamW(Net().parameters(), foreach=True))
    # in-kernel unscaling (no clipping) against the explicit unscale pass (a clip that never bites)
    inside, _, _ = _fp16_run(fused=True, clip=None)
    explicit, _, _ = _fp16_run(fused=True, clip=1e9)
    for a, b in zip(inside.parameters(), explicit.parameters()):
        assert torch.equal(a, b)
    # an inf gradient: the kernel skips the step, weights and optimizer state untouched
    skipped, opt, outcomes = _fp16_run(fused=True, clip=None, poison_step=3)
    after_three, opt3, _ = _fp16_run(fused=True, clip=None, poison_step=None)
    assert [o.skipped for o in outcomes] == [False, False, False, True]
    assert int(opt.state[skipped.out.bias]["step"]) == 3
    ref, _, _ = _fp16_run(fused=True, clip=1e9, poison_step=3)
    for a, b in zip(skipped.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(skipped.parameters(), after_three.parameters()))
    assert opt.grad_scale is None and opt.found_inf is None  # handed over for the step only


def test_model_size_presets_fill_in_under_explicit_keys(tmp_path, capsys):
    base = load_config(None, ["model.size=base"]).model
    assert (base.dim, base.depth, base.heads, base.channels) == (640, 12, 10, [64, 128, 256, 512])
    mine = load_config(None, ["model.size=base", "model.dim=320", "model.heads=4"]).model
    assert (mine.dim, mine.heads, mine.depth) == (320, 4, 12)
    assert load_config(None, []).model.size == "small"
    code, _, err = run_main(capsys, "train", "model.size=huge", f"output_dir={tmp_path}")
    assert code == 2 and "model.size must be one of small, base, large" in err


def test_describe_says_the_device_and_tf32():
    model = Net()
    mp = MixedPrecision("bf16-mixed", tf32=True)
    mp.setup(model)
    assert str(mp.describe()).splitlines()[-1] == "device cpu; FP32 matmuls and convolutions run in IEEE FP32"
    assert mp.state_dict()["tf32"] is True


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x))))).float()


def test_compile_traces_the_plans_boundaries():
    """torch.compile runs a rule's boundary (here: keep ``mid`` in FP32 under bf16-mixed) as the
    eager model does: the boundary is a ``with torch.autocast`` block in the module's forward (a
    class swap), which the compiler traces, where hooks entering and leaving autocast it cannot."""
    x = torch.randn(16, 32)
    outputs = {}
    for name, rules, compiled in [("eager", {"mid": "fp32"}, False), ("compiled", {"mid": "fp32"}, True),
                                  ("no rule", None, False)]:
        torch.manual_seed(0)
        model = Chain()
        mp = MixedPrecision("bf16-mixed", rules, builtin_rules=False)
        mp.setup(model)
        run = torch.compile(model) if compiled else model
        with mp.autocast(), torch.no_grad():
            outputs[name] = run(x)
    assert type(model.mid).__name__ == "Linear" and isinstance(model.mid, nn.Linear)
    ruled = (outputs["compiled"] - outputs["eager"]).abs().max()
    unruled = (outputs["no rule"] - outputs["eager"]).abs().max()
    assert ruled < unruled / 10, (float(ruled), float(unruled))


def test_compiled_training_trains(tiny_dataset, tmp_path):
    """train.compile=true end to end: the compiled step trains like the eager one (same first
    loss for the same init and batch) and no boundary is reported as never run. The aot_eager
    backend traces forward and backward as inductor does but generates no code (seconds, not a
    minute of C++ compile on a CPU); inductor's own code is tested on the boundaries above."""
    from conftest import tiny_overrides

    from vlamp.train.trainer import Trainer

    first = {}
    for name, more in [("eager", []), ("compiled", ["train.compile=true",
                                                    "train.compile_backend=aot_eager"])]:
        cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / name, "bf16-mixed",
                                               "train.steps=2", "dataset.augment=false", *more))
        trainer = Trainer(cfg, progress=False)
        result = trainer.fit()
        first[name] = result.losses[0]
        assert all(torch.isfinite(torch.tensor(result.losses)))
        assert not trainer.mp.uncalled
    assert first["compiled"] == pytest.approx(first["eager"], rel=1e-3)
    assert type(trainer.forward).__name__ == "OptimizedModule"  # the compiled module trained
    with pytest.raises(VlampError, match="train.compile_backend must be a torch.compile backend"):
        load_config(None, ["train.compile_backend=inductr"])
