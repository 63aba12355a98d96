"""The paired comparison of two policies on the same episodes: its statistics against values worked
by hand, a real comparison of the expert against a random policy, and `vlamp eval --compare`."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_main, tiny_overrides

from vlamp import VlampError
from vlamp.sim.compare import compare_paired, mcnemar_exact, paired_difference_interval
from vlamp.sim.env import MetaWorldEnv
from vlamp.sim.evaluate import EvalResult, ExpertPolicy, RandomPolicy, TaskResult, evaluate
from vlamp.sim.tasks import TASKS
from vlamp.train.config_io import load_config
from vlamp.train.policy import load_policy
from vlamp.train.trainer import Trainer


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # 0.34375
    assert mcnemar_exact(5, 5) == 1.0


def test_agresti_min_interval():
    lo, hi = paired_difference_interval(80, 0, 0, 20)  # identical policies
    assert lo < 0 < hi and hi - lo < 0.05
    lo, hi = paired_difference_interval(70, 2, 12, 16)  # B solves 10 more of 100
    assert 0 < lo < 0.10 < hi < 0.2


def result(*outcomes):
    return EvalResult([TaskResult(f"t{i}", len(o), sum(o), 1.0, list(o)) for i, o in enumerate(outcomes)],
                      1, 1.0)


def test_pairs_episode_by_episode():
    a = result([1, 1, 0, 0], [1, 0])
    b = result([1, 0, 1, 1], [1, 1])
    c = compare_paired(a, b)
    assert (c.both, c.only_a, c.only_b, c.neither) == (2, 1, 3, 0)
    assert c.difference == pytest.approx(2 / 6) and c.per_task == {"t0": (1, 2, 4), "t1": (0, 1, 2)}
    assert c.verdict == "no difference shown"
    with pytest.raises(VlampError, match="same tasks and episodes"):
        compare_paired(a, result([1, 1, 0], [1, 0]))


@pytest.mark.slow
def test_the_expert_beats_a_random_policy_on_the_same_episodes():
    kw = {"episodes": 4, "image_size": 16, "max_steps": 100, "progress": False}
    expert = evaluate(ExpertPolicy(), "handle-press,coffee-button", **kw)
    random = evaluate(RandomPolicy(seed=0), "handle-press,coffee-button", **kw)
    c = compare_paired(random, expert)
    assert c.only_b == 8 and c.only_a == 0 and c.difference == 1.0
    assert c.p_value == pytest.approx(2 / 2**8) and c.verdict == "B better"
    assert "B - A: +100.0 points" in c.text()


def test_eval_compare_cli(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(tiny_dataset, run, "fp32", "train.steps=3")),
            progress=False).fit()
    out = tmp_path / "cmp.json"
    p = subprocess.run([sys.executable, "-m", "vlamp", "eval", "--compare", str(run), str(run),
                        "--episodes", "2", "--max-steps", "20", "--no-progress", "--json", str(out)],
                       check=False, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "paired comparison over 4 episodes" in p.stdout and "B - A: +0.0 points" in p.stdout
    c = json.loads(out.read_text())["comparison"]
    assert c["only_a"] == c["only_b"] == 0 and c["p_value"] == 1.0  # a policy against itself
    code, _, err = run_main(capsys, "eval", "--compare", str(run), str(run), "--checkpoint",
                            str(run))
    assert code == 2 and "exclude each other" in err


def test_parallel_evaluation_gives_the_sequential_results(tiny_dataset, tmp_path):
    kw = {"episodes": 2, "image_size": 16, "max_steps": 60, "progress": False}
    one = evaluate(ExpertPolicy(), "handle-press,coffee-button", **kw)
    two = evaluate(ExpertPolicy, "handle-press,coffee-button", workers=2, **kw)  # a recipe
    assert [t.as_dict() for t in one.tasks] == [t.as_dict() for t in two.tasks]
    # a flow-head checkpoint: its sampling noise is seeded per episode, so the process split and
    # the order of episodes do not change a single action: a copy loaded afresh (as a worker
    # process loads it) acts in episode 1 as the copy that ran episode 0 first
    run = tmp_path / "flow"
    Trainer(load_config(None, tiny_overrides(tiny_dataset, run, "fp32", "train.steps=2", "model.head=flow",
                                             "model.flow_steps=2")), progress=False).fit()

    def actions(policy, seeds):  # each episode's first steps
        acts = {}
        with MetaWorldEnv(TASKS["drawer-open"], image_size=32) as env:
            for seed in seeds:
                obs = env.reset(seed)
                policy.reset(seed)
                acts[seed] = []
                for _ in range(4):
                    acts[seed].append(policy(obs))
                    obs, _, _ = env.step(acts[seed][-1][0])  # (a chunk: its first action)
        return acts

    in_order = actions(load_policy(str(run), device="cpu").policy, [0, 1])
    alone = actions(load_policy(str(run), device="cpu").policy, [1])
    assert all((a == b).all() for a, b in zip(in_order[1], alone[1], strict=True))
    policy = load_policy(str(run), device="cpu").policy
    with MetaWorldEnv(TASKS["drawer-open"], image_size=32) as env:
        obs = env.reset(seed=1)
    policy.reset(7)
    first = policy(obs)
    assert not (policy(obs) == first).all()  # the noise moves on within an episode ...
    policy.reset(7)
    assert (policy(obs) == first).all()  # ... and an episode's seed fixes it


def test_a_policy_evaluated_in_this_process_computes_on_one_thread_by_default():
    """As in the worker processes: the same results either way, and no 15x slowdown of a
    multi-threaded batch-1 forward while another process keeps a core busy."""
    import torch

    seen = []

    def policy(obs):
        seen.append(torch.get_num_threads())
        return np.zeros(4, dtype=np.float32)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluate(policy, "reach", 1, max_steps=3, image_size=16, progress=False)
        assert set(seen) == {1} and torch.get_num_threads() == 2  # restored afterwards
        seen.clear()
        evaluate(policy, "reach", 1, max_steps=3, image_size=16, progress=False, threads=2)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
