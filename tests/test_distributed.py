"""Data-parallel and sharded training on real torchrun processes (gloo, 2 ranks, CPU).

One process with batch B and two ranks with B/2 each must train the same steps: the same samples
(a global draw, sliced per rank), the same augmentation, the same loss (each rank's masked mean
weighted by its share of valid steps), gradients averaged over ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

# one xdist group: the module's runs fixture (three torchrun trainings) is trained once
pytestmark = pytest.mark.xdist_group("distributed")
from safetensors.torch import load_file

from vlamp.models.config import ModelConfig
from vlamp.models.tinyvla import TinyVLA
from vlamp.precision.errors import VlampError
from vlamp.precision.fsdp import plan_groups
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.train import distributed
from vlamp.train.config_io import load_config
from vlamp.train.trainer import Trainer

STEPS = ["train.steps=20", "train.save_every=10", "train.val_every=10", "train.grad_accum=2",
         "model.keypoints=true"]  # off by default; its 1-d parameter is what FSDP2 needs


def torchrun(*args: str) -> str:
    """Runs ``torchrun --standalone --nproc-per-node 2 ARGS`` and returns its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def train_2_ranks(dataset, out, *more: str) -> str:
    return torchrun("-m", "vlamp", "train", "--no-progress",
                    *tiny_overrides(dataset, out, "fp32", *STEPS, "train.batch_size=4", *more))


def train_1_process(dataset, out, *more: str):
    cfg = load_config(None, tiny_overrides(dataset, out, "fp32", *STEPS, "train.batch_size=8", *more))
    return Trainer(cfg, progress=False).fit()


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def drop_last(run_dir: Path, copy: Path) -> Path:
    """A copy of a finished run as a kill after step 10 leaves it: the step-10 checkpoint."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000020")
    return copy


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    train_1_process(tiny_dataset, root / "one")
    ddp_out = train_2_ranks(tiny_dataset, root / "ddp")
    fsdp_out = train_2_ranks(tiny_dataset, root / "fsdp", "distributed.strategy=fsdp",
                             "eval.final=true", "eval.episodes=1", "eval.max_steps=20")
    return {"root": root, "dataset": tiny_dataset, "ddp_out": ddp_out, "fsdp_out": fsdp_out}


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_two_ranks_train_as_one_process_with_the_whole_batch(runs):
    root = runs["root"]
    one = [r["loss"] for r in rows(root / "one", "train")]
    assert len(one) == 20
    assert close([r["loss"] for r in rows(root / "ddp", "train")], one, 1e-5)
    assert close([r["loss"] for r in rows(root / "fsdp", "train")], one, 1e-4)
    val = [r["action_l1"] for r in rows(root / "one", "val")]
    assert close([r["action_l1"] for r in rows(root / "ddp", "val")], val, 1e-5)
    assert close([r["action_l1"] for r in rows(root / "fsdp", "val")], val, 1e-4)
    # What the launch says, and rank 0 alone wrote the logs.
    assert "effective batch 16 = 4 x 2 accumulated x 2 ranks (ddp, gloo)" in runs["ddp_out"]
    assert "gradients all-reduced in fp32" in runs["ddp_out"]
    assert "FSDP2 over 2 ranks (gloo)" in runs["fsdp_out"]
    # A sharded run's final evaluation ran (rank 0, on a gathered copy) and its checkpoint is a
    # whole model in the single-process layout.
    assert len(rows(root / "fsdp", "eval")) == 1
    whole = weights(root / "one", 20)
    assert {k: v.shape for k, v in weights(root / "fsdp", 20).items()} == {k: v.shape for k, v in whole.items()}


def distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return float(torch.cat([(a[k].float() - b[k].float()).flatten() for k in a]).norm())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_with_two_ranks_is_bit_exact(runs, strategy):
    root = runs["root"]
    part = drop_last(root / strategy, root / f"{strategy}-2to2")
    train_2_ranks(runs["dataset"], part, f"distributed.strategy={strategy}", "resume=true")
    full = root / strategy
    for name in ("model.safetensors", "train.safetensors"):
        assert (part / "checkpoints/step_0000020" / name).read_bytes() == \
            (full / "checkpoints/step_0000020" / name).read_bytes(), name
    assert [r["loss"] for r in rows(part, "train")] == [r["loss"] for r in rows(full, "train")]


def test_resume_at_another_world_size(runs):
    """2 -> 1 and 1 -> 2. Not bit for bit: two half-batch gradients averaged round differently
    from one whole-batch gradient, and Adam turns last-bit differences of near-zero gradients into
    whole updates. So: the losses agree to 1e-4, and the weights end within 1% of the distance they
    moved over the resumed steps (measured: 0.1%)."""
    root = runs["root"]
    for source, target, args in (("fsdp", "fsdp-2to1", None), ("one", "one-1to2", "fsdp")):
        part = drop_last(root / source, root / target)
        if args is None:
            train_1_process(runs["dataset"], part, "resume=true")
        else:
            train_2_ranks(runs["dataset"], part, f"distributed.strategy={args}", "resume=true")
        full = root / source
        assert close([r["loss"] for r in rows(part, "train")], [r["loss"] for r in rows(full, "train")], 1e-4)
        moved = distance(weights(full, 20), weights(full, 10))
        assert distance(weights(part, 20), weights(full, 20)) <= 0.01 * moved, target


@pytest.mark.slow
def test_mixed_precision_across_ranks(tmp_path):
    """bf16-mixed and fp16-mixed under DDP and FSDP2 (tests/dist_worker.py): the ranks agree, the
    first step equals one process's, FSDP2 keeps the FP32 islands FP32 (traced dtypes, forward and
    backward, the same as one process's), and an overflow on one rank skips the step on both."""
    torchrun(str(Path(__file__).parent / "dist_worker.py"), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text())["runs"] for r in (0, 1))
    assert set(r0) == {"ddp/bf16-mixed", "ddp/fp16-mixed", "fsdp/bf16-mixed", "fsdp/fp16-mixed",
                       "ddp+bf16-reduce/bf16-mixed", "fsdp+bf16-reduce/bf16-mixed"}
    for key, run in r0.items():
        assert run["losses"] == r1[key]["losses"], key
        assert run["losses"][0] == pytest.approx(run["ref_losses"][0], rel=1e-6), key
        assert close(run["losses"], run["ref_losses"], 2e-3), key
    # bf16 reduction really ran in bf16 (later losses move away from the same strategy's FP32
    # reduction, which is bit-deterministic on one machine), under DDP and FSDP2 alike. The two
    # strategies' bf16 sums need not agree in the last bit: DDP compresses the gradient of the
    # FP32 weight, FSDP2 reduces the gradient of the gathered bf16 weight, and which bf16 kernels
    # compute those differs between CPUs (equal on an AVX512-BF16 Xeon, 1 ulp apart on AVX2).
    for strategy in ("ddp", "fsdp"):
        low = r0[f"{strategy}+bf16-reduce/bf16-mixed"]["losses"]
        full = r0[f"{strategy}/bf16-mixed"]["losses"]
        assert low[0] == full[0] and all(a != b for a, b in zip(low[1:], full[1:])), strategy
    assert close(r0["ddp+bf16-reduce/bf16-mixed"]["losses"],
                 r0["fsdp+bf16-reduce/bf16-mixed"]["losses"], 1e-5)
    assert "gradients all-reduced in bf16" in r0["ddp+bf16-reduce/bf16-mixed"]["notes"][0]
    assert "gradients reduced in bf16" in r0["fsdp+bf16-reduce/bf16-mixed"]["notes"][2]
    dtypes = r0["fsdp/bf16-mixed"]["dtypes"]
    assert dtypes == r0["fsdp/bf16-mixed"]["ref_dtypes"]
    islands = [k for k in dtypes if k.endswith(("norm1", "norm2", "norm", "action_out"))]
    # 1 text layer + 2 trunk blocks + 2 conv stages, 2 norms each; text.norm, norm, action_out
    assert len(islands) == 5 * 2 + 3
    assert all(dtypes[k] == ["torch.float32"] for k in islands)
    assert dtypes["trunk.0.qkv"] == ["torch.bfloat16"] and dtypes["vision.stages.0.conv"] == ["torch.bfloat16"]
    notes = "\n".join(r0["fsdp/bf16-mixed"]["notes"])
    assert "trunk.0: 12,576 params gathered in bf16, gradients reduced in fp32" in notes
    assert "trunk.0 (fp32 part): 128 params gathered in fp32" in notes
    for strategy in ("ddp", "fsdp"):
        for r in (r0, r1):
            o = r[f"{strategy}/fp16-mixed"]["overflow"]
            assert o["skipped"] and o["weights_unchanged"], (strategy, o)
            assert o["scale_after"] == o["scale_before"] / 2


def tiny_model() -> TinyVLA:
    return TinyVLA(ModelConfig(vocab_size=50, state_dim=39, action_dim=4, image_size=32, chunk=4,
                               dim=32, depth=1, heads=2, text_layers=1, channels=[8, 8]))


def test_shard_groups_follow_the_plan():
    """Every parameter is in exactly one group; low-precision groups hold only Linear/Conv layers
    that compute in bf16; everything else (norms, embeddings, the action output, bare
    parameters) is gathered in FP32; in fp32 every group is FP32."""
    model = tiny_model()
    mp = MixedPrecision("bf16-mixed")
    mp.setup(model)
    groups = plan_groups(model, mp.resolved)
    assert sum(g.num_params for g, _ in groups) == sum(p.numel() for p in model.parameters())
    low = [g for g, _ in groups if g.param_dtype == torch.bfloat16]
    assert {g.name for g in low} == {"text.layers.0", "vision.stages.0", "vision.stages.1",
                                     "trunk.0", "vision", "state_proj"}
    fp32 = {g.name: g.modules for g, _ in groups if g.param_dtype == torch.float32}
    assert fp32["trunk.0 (fp32 part)"] == ("trunk.0.norm1", "trunk.0.norm2")
    assert fp32["text"] == ("text",)  # the text block keeps token_embed (autocast does not cast it)
    assert "action_out" in fp32 and "(root)" in fp32
    assert all(g.reduce_dtype == torch.float32 for g, _ in groups)
    mp32 = MixedPrecision("fp32")
    m32 = tiny_model()
    mp32.setup(m32)
    assert {g.param_dtype for g, _ in plan_groups(m32, mp32.resolved)} == {torch.float32}


def test_wrong_distributed_settings_are_one_line(tiny_dataset, tmp_path):
    with pytest.raises(VlampError, match="distributed.strategy must be one of ddp, fsdp, got 'zero'"):
        load_config(None, ["distributed.strategy=zero"])
    with pytest.raises(VlampError, match="distributed.reduce_dtype must be one of fp32, bf16, fp16"):
        load_config(None, ["distributed.reduce_dtype=int8"])
    model = tiny_model()
    mp = MixedPrecision("bf16-true")
    mp.setup(model)
    two = distributed.World(rank=0, size=2, local_rank=0, backend="gloo")
    with pytest.raises(VlampError, match="bf16-true stores weights in low precision .* Use "
                                         "precision.mode=bf16-mixed"):
        distributed.wrap(model, mp, "ddp", "fp32", two)
    with pytest.raises(VlampError, match="shard a -mixed mode instead"):
        mp.shard()
    p = subprocess.run([sys.executable, "-m", "vlamp", "train", "distributed.strategy=zero"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "distributed.strategy" in p.stderr


def test_my_share_and_loss_shares_in_one_process():
    """One process: the whole draw, in micro-batch order; no loss factors."""
    import numpy as np

    positions = np.arange(12)
    two = distributed.World(rank=1, size=2, local_rank=1, backend="gloo")
    assert [list(x) for x in distributed.my_share(positions, 2, distributed.World())] == \
        [list(range(6)), list(range(6, 12))]
    assert [list(x) for x in distributed.my_share(positions, 2, two)] == [[3, 4, 5], [9, 10, 11]]
    assert distributed.loss_shares([torch.ones(3, 4)], distributed.World()) is None


@pytest.mark.slow
def test_bench_runs_a_mode_on_two_torchrun_ranks(tmp_path):
    """``vlamp bench --nproc 2``: the modes on 2 real ranks (FSDP2 here) beside a 1-process fp32
    run; throughput reported in total and per rank, and against the single process."""
    out = tmp_path / "bench"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MUJOCO_GL": "egl"}
    p = subprocess.run([sys.executable, "-m", "vlamp", "bench", "--quick", "--nproc", "2",
                        "--modes", "fp32", "--steps", "4", "--warmup", "1", "--episodes", "0",
                        "--no-progress", "--out", str(out), "distributed.strategy=fsdp"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["mode"], r["ranks"], r["strategy"]) for r in runs] == [("fp32", 2, "fsdp"), ("fp32", 1, None)]
    two, one = runs
    assert two["samples_per_s"] == pytest.approx(2 * two["batch_size"] / two["step_time_s_median"])
    assert two["samples_per_s_per_rank"] == pytest.approx(two["samples_per_s"] / 2)
    assert two["scaleout_vs_1_process"] == pytest.approx(two["samples_per_s"] / one["samples_per_s"])
    assert one["scaleout_vs_1_process"] is None
    assert two["state_bytes"] < one["state_bytes"]  # each rank holds its shards only
    assert "fp32 x2 ranks (fsdp)" in p.stdout and "vs 1 process" in p.stdout


def test_each_rank_draws_its_own_forward_noise_and_the_shared_stream_stays():
    """The flow head's noise must differ between ranks (as between one process's samples); the
    stream that draws positions and augmentation must stay the same on every rank."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    draws = []
    for rank in (0, 1):
        with distributed.own_noise(distributed.World(rank, 2, rank, "gloo"), 0, 5, torch.device("cpu")):
            draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(torch.get_rng_state(), before)
    with distributed.own_noise(distributed.World(0, 2, 0, "gloo"), 0, 5, torch.device("cpu")):
        assert torch.equal(torch.rand(4), draws[0])  # seeded by (seed, step, rank): resumable
    with distributed.own_noise(distributed.World(), 0, 5, torch.device("cpu")):
        torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), before)  # one process: the shared stream itself
