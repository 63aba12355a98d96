"""The trainer end to end on a tiny dataset: every mode trains, resume is bit-exact, checkpoints
are verified, configs are checked, and TinyVLA's FP32 islands really compute in FP32."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_main, tiny_overrides
from safetensors.torch import load_file

from vlamp import MODE_NAMES
from vlamp.models.config import ModelConfig
from vlamp.models.tinyvla import TinyVLA
from vlamp.precision.errors import VlampError
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.scaler import StaticLossScaler
from vlamp.precision.verify import trace_compute_dtypes
from vlamp.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from vlamp.train.config_io import load_config
from vlamp.train.step import learning_rate
from vlamp.train.trainer import Trainer

pytestmark = pytest.mark.slow


def run(dataset, out, mode="fp32", *more):
    return Trainer(load_config(None, tiny_overrides(dataset, out, mode, *more)), progress=False).fit()


def train_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_short_run_in_every_mode_trains_logs_and_checkpoints(tiny_dataset, tmp_path, mode):
    out = tmp_path / mode
    r = run(tiny_dataset, out, mode, "train.steps=4", "train.grad_accum=2")
    assert len(r.losses) == 4 and all(torch.isfinite(torch.tensor(r.losses)))
    assert r.val_action_l1 is not None and r.val_action_l1 > 0
    assert [p.name for p in list_checkpoints(out)] == ["step_0000003", "step_0000004"]
    assert (out / "config.yaml").read_text().count(f"mode: {mode}") == 1
    assert [row["step"] for row in train_rows(out)] == [1, 2, 3, 4]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    weights = load_file(out / "checkpoints" / "step_0000004" / "model.safetensors")
    low = {"bf16-true": torch.bfloat16, "fp16-true": torch.float16,
           "bf16-storage": torch.bfloat16}.get(mode, torch.float32)
    assert weights["trunk.0.qkv.weight"].dtype == low
    assert weights["action_out.weight"].dtype == torch.float32  # an FP32 island in every mode


def test_loss_goes_down(tiny_dataset, tmp_path):
    r = run(tiny_dataset, tmp_path / "r", "fp32", "train.steps=40", "train.save_every=0",
            "train.val_every=0", "train.lr=3e-3")
    assert sum(r.losses[-5:]) / 5 < 0.7 * r.losses[0]


@pytest.mark.parametrize("mode", ["fp32", "fp16-mixed", "bf16-storage"])
def test_resume_is_bit_exact(tiny_dataset, tmp_path, mode):
    """Stop after step 3 (the checkpoint), resume to step 6: same losses, same final bytes."""
    full = tmp_path / "full"
    run(tiny_dataset, full, mode, "train.ema_decay=0.9")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000006")
    resumed = run(tiny_dataset, part, mode, "train.ema_decay=0.9", "resume=true")
    assert len(resumed.losses) == 3
    assert [r["loss"] for r in train_rows(part)] == [r["loss"] for r in train_rows(full)]
    for name in ("model.safetensors", "train.safetensors"):
        a = (full / "checkpoints" / "step_0000006" / name).read_bytes()
        b = (part / "checkpoints" / "step_0000006" / name).read_bytes()
        assert a == b, name


def test_corrupted_checkpoint_falls_back_to_the_previous_one(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    run(tiny_dataset, out)
    newest = out / "checkpoints" / "step_0000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    with pytest.warns(UserWarning, match="does not match its checksum"):
        c = latest_checkpoint(out)
    assert c.step == 3
    (out / "checkpoints" / "step_0000003" / "state.json").write_text("{}")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        latest_checkpoint(out)


def test_resume_rules(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    run(tiny_dataset, out, "fp32", "train.steps=3")
    with pytest.raises(VlampError, match="already holds checkpoints"):
        run(tiny_dataset, out, "fp32", "train.steps=3")
    with pytest.raises(VlampError, match="model.dim: checkpoint 32, config 64"):
        run(tiny_dataset, out, "fp32", "train.steps=5", "model.dim=64", "resume=true")
    with pytest.warns(UserWarning, match="resuming a fp32 run in bf16-mixed"):
        r = run(tiny_dataset, out, "bf16-mixed", "train.steps=4", "resume=true")
    assert len(r.losses) == 1
    with pytest.raises(VlampError, match="has no checkpoints"):
        run(tiny_dataset, tmp_path / "empty", "fp32", "resume=true")


def test_skipped_steps_do_not_advance_the_schedule(tiny_dataset, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "r", "fp16-mixed", "train.steps=3"))
    trainer = Trainer(cfg, progress=False)
    trainer.mp.scalers[0] = StaticLossScaler(1e30)  # every fp16 gradient overflows
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    r = trainer.fit()
    assert r.skipped_steps == 3 and trainer.applied_steps == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert {row["lr"] for row in train_rows(tmp_path / "r")} == {learning_rate(0, 1e-3, 2, 3, 0.05)}


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 1.0, 10, 110, 0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == pytest.approx(0.1)


COMPUTE_MODULES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)


@pytest.mark.parametrize("head", ["act", "flow"])
def test_fp32_islands_compute_in_fp32_under_bf16_mixed(head):
    from vlamp.models.tinyvla import Attention

    model = TinyVLA(ModelConfig(vocab_size=8, dim=32, depth=1, heads=2, text_layers=1,
                                channels=[8, 8], chunk=4, head=head, image_size=16,
                                max_tokens=3))
    mp = MixedPrecision("bf16-mixed")
    mp.setup(model)
    b = {"image": torch.rand(2, 3, 16, 16), "state": torch.randn(2, 4),
         "tokens": torch.tensor([[2, 3, 0], [4, 5, 6]]), "actions": torch.randn(2, 4, 4),
         "action_mask": torch.ones(2, 4, dtype=torch.bool)}

    def step():  # forward and backward: gradient kernels are checked too
        with mp.autocast():
            loss = model(b)
        mp.backward(loss)

    outputs = {}

    def record(name):
        def hook(module, args, out):
            outputs[name] = out if isinstance(out, tuple) else (out,)
        return hook

    islands = ["loss_fn"] + (["time_embed", "time_sampler"] if head == "flow" else [])
    for name in islands:  # element-wise islands: check outputs
        getattr(model, name).register_forward_hook(record(name))
    seen = trace_compute_dtypes(model, step, backward=True)
    assert {name: {t.dtype for t in out} for name, out in outputs.items()} == {
        name: {torch.float32} for name in islands}
    ruled = {r.name: r.policy.compute for r in mp.plan.resolve(model)}
    # every module that computes was traced (none left unchecked), in exactly its ruled dtype
    computing = {n for n, m in model.named_modules() if isinstance(m, (*COMPUTE_MODULES, Attention))}
    assert computing <= set(seen), computing - set(seen)
    for name, dtypes in seen.items():
        assert dtypes == {ruled[name]}, (name, dtypes)
    assert seen["action_out"] == {torch.float32} and seen["trunk.0.attention"] == {torch.bfloat16}
    assert seen["vision.stages.0.norm1"] == {torch.float32} and seen["trunk.0.qkv"] == {torch.bfloat16}
    assert len(computing) >= 20  # the whole model, not a part of it


def test_spatial_softmax_finds_each_channels_peak():
    from vlamp.models.tinyvla import SpatialSoftmax

    x = torch.zeros(1, 2, 5, 9)
    x[0, 0, 1, 6] = 30.0  # channel 0 peaks at row 1, column 6; channel 1 is flat
    xy = SpatialSoftmax()(x).view(2, 2)
    # x runs over the 9 columns from -1 to 1, y over the 5 rows
    assert xy[0].tolist() == pytest.approx([-1 + 6 * 2 / 8, -1 + 1 * 2 / 4], abs=1e-4)
    assert xy[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_keypoints_add_one_image_token_and_old_checkpoints_rebuild_without():
    from vlamp.models.config import saved_model_config

    shape = dict(vocab_size=8, dim=32, depth=1, heads=2, text_layers=1, channels=[8, 8], chunk=4,
                 image_size=16, max_tokens=3)
    with_kp, without = TinyVLA(ModelConfig(**shape, keypoints=True)), TinyVLA(ModelConfig(**shape))
    assert with_kp.config.keypoints and with_kp.pos_embed.weight.shape[1] == \
        without.pos_embed.weight.shape[1] + 1
    extra = set(with_kp.state_dict()) - set(without.state_dict())
    assert extra == {"vision.spatial_softmax.log_temperature", "vision.keypoint_proj.weight",
                     "vision.keypoint_proj.bias"}
    # A config saved before the key existed (no "keypoints") is the model without them.
    rebuilt = TinyVLA(ModelConfig(**saved_model_config(shape)))
    rebuilt.load_state_dict(without.state_dict())  # strict: the same parameters
    # A config from a newer vlamp, with a setting this one lacks, is refused by name.
    with pytest.raises(VlampError, match="coords.*newer version"):
        saved_model_config({**shape, "coords": True})


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vlamp", *args], capture_output=True, text=True,
                          timeout=300)


def test_train_and_eval_checkpoint_through_the_cli(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    p = cli("train", "--no-progress", *tiny_overrides(tiny_dataset, out, "bf16-mixed", "train.steps=3"))
    assert p.returncode == 0, p.stderr
    assert "precision bf16-mixed" in p.stdout and "vlamp eval --checkpoint" in p.stdout
    assert re.search(r"step 3/3: loss \d\.\d{4}, validation action L1 \d\.\d{4}, [\d.]+ s/step",
                     p.stderr), p.stderr  # without bars, a log of a long run still shows progress
    p = cli("eval", "--checkpoint", str(out), "--episodes", "1", "--max-steps", "10",
            "--json", str(tmp_path / "e.json"))
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert [t["task"] for t in result["per_task"]] == ["drawer-open", "drawer-close"]
    assert "precision bf16-mixed" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["train.step=3"], "unknown config key 'train.step'; did you mean 'train.steps'?"),
    (["--train.batch_size=many"], "`train.batch_size`: Couldn't parse 'many' into an int"),
    (["precision.mode=fp12"], "fp12"),
    (["model.head=diffusion"], "model.head must be one of act, flow"),
    (["steps"], "is not key=value"),
    (["precision.lean_islands=-1"], "precision.lean_islands must be a fraction >= 0 (0: off)"),
])
def test_config_errors_exit_2_in_one_line(tiny_dataset, tmp_path, args, message, capsys):
    rc, _, err = run_main(capsys, "train", f"dataset.path={tiny_dataset}",
                          f"output_dir={tmp_path / 'r'}", *args)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_each_config_section_checks_its_values_when_built():
    """A section built in code (``dataclasses.replace``, a constructor) is checked as one read from
    the command line: nonsense cannot enter a RunConfig by the back door."""
    import dataclasses

    from vlamp.train.config import EvalConfig, LoraConfig, RunConfig

    config = load_config(None, [])
    cases = [(lambda: dataclasses.replace(config.train, steps=0), "train.steps must be >= 1"),
             (lambda: dataclasses.replace(config.precision, mode="fp12"), "fp12"),
             (lambda: dataclasses.replace(config.dataset, image_size=8), "dataset.image_size >= 16"),
             (lambda: dataclasses.replace(config.distributed, strategy="zero3"), "ddp, fsdp"),
             (lambda: EvalConfig(workers=-1), "eval.workers"),
             (lambda: LoraConfig(rank=4), "targets must name linear layers"),
             (lambda: dataclasses.replace(config, precision=dataclasses.replace(
                 config.precision, step_in_backward=True)), "train.grad_accum=1")]
    for build, message in cases:
        with pytest.raises(VlampError, match=re.escape(message)):
            build()
    assert isinstance(dataclasses.replace(config, output_dir="x"), RunConfig)  # a legal one builds


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    rc, _, err = run_main(capsys, "train", "--config", str(bad))
    assert rc == 2 and "did you mean 'train.steps'" in err
    bad.write_text("[1, 2")
    rc, _, err = run_main(capsys, "train", "--config", str(bad))
    assert rc == 2 and "not valid YAML" in err
    rc, _, err = run_main(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "not found" in err


def test_eval_of_a_corrupted_checkpoint_exits_2(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    run(tiny_dataset, out, "fp32", "train.steps=3")
    (out / "checkpoints" / "step_0000003" / "train.safetensors").write_bytes(b"junk")
    p = cli("eval", "--checkpoint", str(out / "checkpoints" / "step_0000003"), "--episodes", "1")
    assert p.returncode == 2 and "does not match its checksum" in p.stderr


def test_measured_plan_is_saved_and_a_resume_trains_on_with_it(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    first = Trainer(load_config(None, tiny_overrides(tiny_dataset, out, "bf16-mixed",
                                                     "precision.measure=true")), progress=False)
    first.fit()
    used = first.mp.plan.to_dict()
    assert used["measured"]["reason"]  # measured here, or said why not (no native bf16)
    state = json.loads((out / "checkpoints" / "step_0000006" / "state.json").read_text())
    assert state["precision"]["plan"] == json.loads(json.dumps(used))

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not measure again")

    monkeypatch.setattr("vlamp.precision.autoplan.measure_plan", refuse)
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    again = Trainer(load_config(None, tiny_overrides(tiny_dataset, out, "auto", "resume=true",
                                                     "precision.measure=true")), progress=False)
    assert again.mp.plan.to_dict() == json.loads(json.dumps(used)) and again.mp.mode.name == "bf16-mixed"
    from vlamp.train.policy import load_policy

    loaded = load_policy(str(out))
    assert loaded.policy.mp.plan.to_dict()["rules"] == used["rules"]


def test_the_trainers_evaluation_in_worker_processes_matches_in_process(tiny_dataset, tmp_path):
    """eval.workers=2 builds the policy in each process from a temporary checkpoint of the
    weights evaluated (the EMA here): the same episodes, the same outcomes as in process."""
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "r", "bf16-mixed", "train.steps=3",
                                           "train.ema_decay=0.5", "eval.episodes=2", "eval.max_steps=30"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    cfg.eval.workers = 1
    alone = trainer.evaluate()
    cfg.eval.workers = 2
    spread = trainer.evaluate()
    assert [t["task"] for t in spread["per_task"]] == [t["task"] for t in alone["per_task"]]
    assert [t["outcomes"] for t in spread["per_task"]] == [t["outcomes"] for t in alone["per_task"]]
    assert spread["episodes"] == alone["episodes"] == 4
