"""All 50 Meta-World tasks and the named suites: resolution, the expert on newly added tasks (goal
markers rendered where the goal is a point in space), and generation that tells a failing task early,
gives it up after a bounded number of tries and keeps the other tasks' episodes."""

import numpy as np
import pytest
from conftest import run_main

from vlamp import VlampError
from vlamp.data.generate import GIVE_UP, generate, generation_report
from vlamp.data.reader import read_dataset
from vlamp.sim.evaluate import ExpertPolicy, evaluate
from vlamp.sim.tasks import DEFAULT_SUITE, SUITES, TASKS, resolve_tasks


def names(spec):
    return [t.name for t in resolve_tasks(spec)]


def test_every_metaworld_task_is_in_the_table_with_its_expert():
    import metaworld
    import metaworld.env_dict
    import metaworld.policies

    assert {t.env_name for t in TASKS.values()} == set(metaworld.ALL_V3_ENVIRONMENTS)
    assert all(hasattr(metaworld.policies, t.expert) for t in TASKS.values())
    first_words = {" ".join(t.instruction.split()[:8]) for t in TASKS.values()}
    assert len(first_words) == 50  # distinct within the tokenizer's 8 words
    assert [f"{n}-v3" for n in SUITES["mt10"]] == list(metaworld.env_dict.MT10_V3)  # MT10's order
    assert sorted(f"{n}-v3" for n in SUITES["mt50"]) == sorted(metaworld.env_dict.MT50_V3)


def test_suites_and_names_mix_in_one_list(capsys):
    assert names("mt10") == list(SUITES["mt10"]) and len(names("MT50")) == 50
    assert names(None) == names("default") == list(DEFAULT_SUITE)
    assert names("reach,mt10, drawer-close-v3") == list(SUITES["mt10"])  # each task once, in order
    assert names("sweep-into,default") == ["sweep-into", *DEFAULT_SUITE]
    with pytest.raises(VlampError, match=r"unknown task 'drawer-opn'; did you mean 'drawer-open'\? "
                                         r"suites: default, mt10, mt50; tasks: assembly, "):
        resolve_tasks("mt10,drawer-opn")
    code, _, err = run_main(capsys, "eval", "--tasks", "mt11")
    assert code == 2 and "suites: default, mt10, mt50" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_expert_solves_newly_added_tasks_rendered():
    tasks = ["reach", "push", "pick-place", "coffee-pull", "hammer", "assembly"]
    result = evaluate(ExpertPolicy(), tasks, episodes=1, image_size=32, progress=False)
    assert {t.task: t.successes for t in result.tasks} == dict.fromkeys(tasks, 1)


@pytest.mark.slow
def test_a_goal_in_free_space_is_drawn_and_a_paired_scenes_goal_is_not():
    import dataclasses

    from vlamp.sim.env import MetaWorldEnv

    images = {}
    for shown in (True, False):
        with MetaWorldEnv(dataclasses.replace(TASKS["reach"], show_goal=shown), image_size=64) as env:
            images[shown] = env.reset(seed=3).image.astype(int)
    diff = np.abs(images[True] - images[False]).sum(-1) > 60
    assert 4 <= diff.sum() <= 200  # a marker of a few pixels, nothing else changed
    red = images[True][diff]
    assert (red[:, 0] > red[:, 1] + 60).mean() > 0.5  # reach's marker is red
    assert not TASKS["drawer-open"].show_goal and TASKS["reach"].show_goal


@pytest.mark.slow
def test_generation_gives_up_a_failing_task_and_keeps_the_others(tmp_path):
    # 45 steps: handle-press succeeds (its expert needs ~31), drawer-open cannot (~88)
    root = generate("handle-press,drawer-open", GIVE_UP + 1, out=tmp_path / "ds", image_size=16,
                    max_steps=45, max_tries=2, workers=1, progress=False)
    data = read_dataset(root)
    assert data.tasks == [TASKS["handle-press"].instruction] and data.num_episodes == GIVE_UP + 1
    report = generation_report(root)["tasks"]
    assert report["handle-press"]["kept"] == GIVE_UP + 1 and not report["handle-press"]["given_up"]
    failing = report["drawer-open"]
    assert failing["given_up"] and failing["kept"] == 0 and failing["failed_episodes"] == GIVE_UP
    assert failing["rollouts"] == GIVE_UP * 2  # bounded: the last episode was not tried
    assert failing["expert_success_rate"] == 0.0


@pytest.mark.slow
def test_generation_never_uses_the_evaluation_episodes_seeds(tmp_path, capsys):
    with pytest.raises(VlampError, match=r"seeds up to 1,000,019; evaluation episodes use 1,000,000 "
                                         r"and up.*choose a seed from 0 to 9"):
        generate("drawer-open", 1, seed=10, out=tmp_path / "ds", progress=False)
    code, _, err = run_main(capsys, "data", "generate", "--seed", "9", "--episodes-per-task",
                            "200", "--out", str(tmp_path / "ds"))
    assert code == 2 and "choose a seed from 0 to 8" in err
    assert not (tmp_path / "ds").exists()
