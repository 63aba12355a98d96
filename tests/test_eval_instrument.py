"""The evaluation as an instrument: how chunks become actions (receding horizon, temporal
ensembling), how many episodes an interval of +-5 points takes, and which camera a policy sees."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from vlamp import VlampError
from vlamp.sim.env import CAMERAS, MetaWorldEnv
from vlamp.sim.evaluate import (
    ChunkExecutor, EvalResult, TaskResult, episodes_for, evaluate, half_width, wilson_interval)
from vlamp.sim.tasks import TASKS


def _chunk(t: int, n: int = 5) -> np.ndarray:
    """A chunk predicted at step t whose i-th action is t * 100 + i in every dimension."""
    return (t * 100 + np.arange(n, dtype=np.float32))[:, None].repeat(4, 1)


def _drive(executor: ChunkExecutor, steps: int) -> tuple[list[int], list[float]]:
    queries, actions = [], []
    for t in range(steps):
        if executor.needs_query():
            queries.append(t)
            executor.add(_chunk(t))
        actions.append(float(executor.next_action()[0]))
    return queries, actions


def test_receding_horizon_executes_each_chunk_in_order():
    queries, actions = _drive(ChunkExecutor(replan_every=3), 7)
    assert queries == [0, 3, 6]
    assert actions == [0, 1, 2, 300, 301, 302, 600]
    # A horizon longer than the chunk queries when the chunk runs out.
    queries, _ = _drive(ChunkExecutor(replan_every=8), 12)
    assert queries == [0, 5, 10]


def test_temporal_ensembling_weights_the_oldest_prediction_most():
    k = 0.5
    _, actions = _drive(ChunkExecutor(replan_every=1, ensemble=k), 7)
    # Step 2 is predicted by the chunks of steps 0 (its action 2), 1 (101) and 2 (200).
    w = np.exp(-k * np.arange(3))
    assert actions[2] == pytest.approx((w @ [2, 101, 200]) / w.sum())
    # Step 6: the chunks of steps 0 and 1 ran out (5 actions each), those of steps 2..6 vote.
    w = np.exp(-k * np.arange(5))
    votes = [204, 303, 402, 501, 600]
    assert actions[6] == pytest.approx((w @ votes) / w.sum())
    # A very large k leaves only the oldest live chunk: a prediction made earliest wins.
    _, actions = _drive(ChunkExecutor(replan_every=1, ensemble=50.0), 7)
    assert actions[:5] == pytest.approx([0, 1, 2, 3, 4]) and actions[6] == pytest.approx(204)


def test_executor_rejects_nonsense():
    with pytest.raises(VlampError, match="replan_every must be >= 1"):
        ChunkExecutor(0)
    with pytest.raises(VlampError, match="ensemble >= 0"):
        ChunkExecutor(1, -0.1)


def test_episodes_for_an_interval_of_5_points():
    # Textbook sizes: p(1-p) z^2 / 0.05^2 is 384 at 0.5 and 138 at 0.9; Wilson's are close.
    assert episodes_for(0.5) == 381
    assert episodes_for(0.9) == 141
    assert 30 <= episodes_for(1.0) <= 40
    for rate in (0.5, 0.75, 0.9, 0.97):
        n = episodes_for(rate)
        assert half_width(round(rate * n), n) <= 0.05 < half_width(round(rate * (n - 1)), n - 1)
    lo, hi = wilson_interval(90, 100)
    assert half_width(90, 100) == pytest.approx((hi - lo) / 2)
    with pytest.raises(VlampError):
        episodes_for(1.5)


def test_the_result_says_its_interval_and_what_would_make_it_5_points():
    def result(successes: list[int], n: int) -> EvalResult:
        return EvalResult([TaskResult(f"t{i}", n, s, 100.0, [True] * s + [False] * (n - s))
                           for i, s in enumerate(successes)], 1000, 1.0)

    wide = result([8, 6, 9], 10)  # 23/30
    assert wide.half_width == pytest.approx(half_width(23, 30))
    assert wide.episodes_needed() == -(-episodes_for(23 / 30) // 3)
    text = wide.table()
    assert f"+-{wide.half_width * 100:.1f} points" in text
    assert f"about {wide.episodes_needed()} episodes per task" in text
    tight = result([48, 47, 50], 50)
    assert tight.half_width <= 0.05 and "would make it" not in tight.table()
    assert tight.as_dict()["ci95_half_width"] == pytest.approx(tight.half_width)


@pytest.mark.slow
def test_the_camera_renders_what_it_says():
    task = TASKS["drawer-open"]
    with MetaWorldEnv(task, image_size=32) as ws, MetaWorldEnv(task, image_size=32, camera="corner") as co:
        a, b = ws.reset(1_000_000).image, co.reset(1_000_000).image
    assert ws.camera == "workspace" and "workspace" in CAMERAS
    assert a.shape == b.shape == (32, 32, 3) and np.abs(a.astype(int) - b).mean() > 10
    with pytest.raises(VlampError, match="unknown camera 'side'; legal: workspace, corner"):
        MetaWorldEnv(task, camera="side")


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_from_the_camera_it_was_trained_on(tiny_dataset, tmp_path):
    from conftest import tiny_overrides
    from vlamp.data.generate import generate, generation_report
    from vlamp.train.config_io import load_config
    from vlamp.train.policy import load_policy
    from vlamp.train.trainer import Trainer

    assert generation_report(tiny_dataset)["camera"] == "workspace"
    corner = generate("drawer-open,drawer-close", 3, out=tmp_path / "corner", workers=1,
                      progress=False, image_size=32, camera="corner")
    assert generation_report(corner)["camera"] == "corner"
    Trainer(load_config(None, tiny_overrides(corner, tmp_path / "run")), progress=False).fit()
    loaded = load_policy(str(tmp_path / "run"), device="cpu")
    assert loaded.camera == "corner"
    # A checkpoint from before the camera was recorded was trained on corner images.
    step = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    state = json.loads((step / "state.json").read_text())
    del state["camera"]
    (step / "state.json").write_text(json.dumps(state))
    sums = json.loads((step / "checksums.json").read_text())
    sums["state.json"] = hashlib.sha256((step / "state.json").read_bytes()).hexdigest()
    (step / "checksums.json").write_text(json.dumps(sums))
    assert load_policy(str(step), device="cpu").camera == "corner"
    # vlamp eval follows the checkpoint and refuses another camera in one line.
    cmd = [sys.executable, "-m", "vlamp", "eval", "--checkpoint", str(tmp_path / "run"),
           "--episodes", "1", "--max-steps", "5", "--workers", "1", "--no-progress"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + ["--camera", "workspace"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "trained on images from corner" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_evaluation_defaults_are_one_set():
    import inspect

    from vlamp.sim import evaluate as ev
    from vlamp.train.config import EvalConfig

    c, sig = EvalConfig(), inspect.signature(evaluate).parameters
    assert (c.episodes, c.replan_every, c.ensemble) == (ev.EPISODES, ev.REPLAN_EVERY, ev.ENSEMBLE)
    assert (sig["episodes"].default, sig["replan_every"].default, sig["ensemble"].default) == \
        (ev.EPISODES, ev.REPLAN_EVERY, ev.ENSEMBLE)
    # the episode limit: "not given" in both, which means ev.episode_limit of the tasks
    assert c.max_steps == 0 and sig["max_steps"].default is None
