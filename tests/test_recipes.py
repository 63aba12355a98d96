"""The multi-task recipes (MT10, MT50) and evaluation as the field reports it: Meta-World's
difficulty groups, its 500-step episode limit, and a recipe run end to end on a tiny scale."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from vlamp import VlampError
from vlamp.sim.evaluate import (
    MAX_STEPS,
    METAWORLD_MAX_STEPS,
    EvalResult,
    TaskResult,
    episode_limit,
    evaluate,
)
from vlamp.sim.tasks import DEFAULT_SUITE, DIFFICULTY, SUITES, TASKS, resolve_tasks
from vlamp.train.config_io import load_config
from vlamp.train.recipes import recipe_names


def test_bench_of_a_recipe_trains_and_evaluates_as_the_recipe_does():
    """`vlamp bench --config mt10` compares precisions on the recipe's own training (5,000 steps,
    10 episodes per task); it once ran the default bench's 300 steps whatever the config said.
    --steps, --episodes and train.steps= still win."""
    from vlamp.cli.bench import run_config
    from vlamp.cli.main import build_parser

    def settings(*argv):
        args, extra = build_parser().parse_known_args(["bench", *argv])
        args.extra = extra
        config, episodes = run_config(args)
        return config.train.steps, episodes, config.eval.max_steps

    assert settings("--config", "mt10") == (5000, 10, 500)
    assert settings("--config", "mt50", "--steps", "40", "--episodes", "2") == (40, 2, 500)
    assert settings("--config", "mt10", "train.steps=700")[0] == 700
    assert settings()[:2] == (300, 5) and settings("train.steps=50")[0] == 50


def test_every_task_is_in_exactly_one_difficulty_group():
    grouped = [t for tasks in DIFFICULTY.values() for t in tasks]
    assert sorted(grouped) == sorted(TASKS) and len(grouped) == len(set(grouped)) == 50
    assert {g: len(t) for g, t in DIFFICULTY.items()} == \
        {"easy": 28, "medium": 11, "hard": 6, "very hard": 5}


def _result(rates: dict[str, int], n: int = 10) -> EvalResult:
    return EvalResult([TaskResult(t, n, s, 100.0, [True] * s + [False] * (n - s))
                       for t, s in rates.items()], 1000, 1.0, METAWORLD_MAX_STEPS)


def test_the_table_gives_each_difficulty_groups_mean_of_task_rates():
    mt10 = dict(zip(SUITES["mt10"], [3, 0, 1, 10, 10, 10, 9, 1, 10, 10]))
    result = _result(mt10)
    groups = result.groups()
    # reach 3, door-open 10, drawer-open 10, drawer-close 10, button-press-topdown 9, window x2 10
    assert groups["easy"] == pytest.approx(((3 + 10 + 10 + 10 + 9 + 10 + 10) / 70, 7))
    assert groups["medium"] == pytest.approx((0.1, 1))  # peg-insert-side
    assert groups["hard"] == pytest.approx(((0 + 1) / 20, 2))  # push, pick-place
    assert list(groups) == ["easy", "medium", "hard"]  # in DIFFICULTY's order, only those run
    text = result.table()
    assert "by difficulty (mean of the tasks' rates): easy 88.6% (7 tasks), medium 10.0% (1 task)" \
        ", hard 5.0% (2 tasks)" in text and "at most 500 steps" in text
    assert result.as_dict()["groups"]["hard"] == {"success_rate": 0.05, "tasks": 2}
    assert "by difficulty" not in _result(dict.fromkeys(DEFAULT_SUITE, 5)).table()  # all easy


def test_the_episode_limit_is_metaworlds_own_outside_the_default_suite():
    assert episode_limit(resolve_tasks("default")) == MAX_STEPS == 200
    assert episode_limit(resolve_tasks("mt10")) == episode_limit(resolve_tasks("drawer-open,reach")) \
        == METAWORLD_MAX_STEPS == 500


@pytest.mark.slow
def test_an_episode_runs_to_the_limit_the_tasks_call_for():
    def still(obs):  # never moves: fails every task, so each episode lasts exactly its limit
        return np.zeros(4, dtype=np.float32)

    result = evaluate(still, "reach", episodes=1, image_size=16, progress=False)
    assert [t.mean_length for t in result.tasks] == [500.0] and result.max_steps == 500
    assert result.env_steps == 500 and result.tasks[0].successes == 0
    short = evaluate(still, "reach", episodes=1, image_size=16, progress=False, max_steps=7)
    assert short.tasks[0].mean_length == 7.0
    # (which tasks get 500 and which 200: the test above)


def test_the_eval_command_prints_the_groups_and_rejects_a_bad_limit(tmp_path, capsys):
    out = tmp_path / "eval.json"
    p = subprocess.run([sys.executable, "-m", "vlamp", "eval", "--policy", "random", "--tasks",
                        "reach,push", "--episodes", "1", "--max-steps", "5", "--image-size", "16",
                        "--workers", "1", "--no-progress", "--json", str(out)],
                       check=False, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "by difficulty (mean of the tasks' rates): easy 0.0% (1 task), hard 0.0% (1 task)" \
        in p.stdout
    saved = json.loads(out.read_text())
    assert saved["max_steps"] == 5 and set(saved["groups"]) == {"easy", "hard"}
    code, _, err = run_main(capsys, "eval", "--max-steps", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--max-steps must be >= 1, got 0" in err


def test_every_shipped_recipe_loads_as_the_suite_it_names():
    names = recipe_names()
    assert names == ["mt10", "mt50"]
    for name in names:
        config = load_config(name)
        assert [t.name for t in resolve_tasks(config.dataset.tasks)] == list(SUITES[name])
        assert config.eval.max_steps == 500 and config.eval.episodes >= 10
        assert not config.dataset.path  # generated from the suite on first use
    assert load_config("mt10", ["train.steps=7"]).train.steps == 7  # overrides still win


def test_a_bad_recipe_name_or_suite_is_one_line_naming_the_legal_ones(capsys):
    with pytest.raises(VlampError, match=r"config file 'mt11' not found \(a YAML file, or one of "
                                         r"vlamp's recipes: mt10, mt50\)"):
        load_config("mt11")
    with pytest.raises(VlampError, match=r"dataset.tasks: unknown task 'mt5'; did you mean"):
        load_config(None, ["dataset.tasks=mt5"])
    with pytest.raises(VlampError, match=r"dataset.tasks .* dataset.path .*: give one of them"):
        load_config(None, ["dataset.tasks=mt10", "dataset.path=data/mt10"])
    code, _, err = run_main(capsys, "train", "--config", "mt11")
    assert code == 2 and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_recipe_generates_its_suite_trains_and_evaluates_end_to_end(tmp_path, monkeypatch):
    from conftest import TINY_MODEL

    from vlamp.train.trainer import Trainer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the generated data goes here
    config = load_config("mt10", [
        "dataset.tasks=reach,drawer-close", "dataset.episodes_per_task=2", "dataset.image_size=16",
        "dataset.val_episodes=1", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
        "eval.episodes=1", "eval.workers=1", "precision.mode=fp32", "precision.measure=false",
        f"output_dir={tmp_path / 'run'}", *TINY_MODEL, "model.channels=[8,8]"])
    # the recipe evaluates at Meta-World's 500 steps (the test above runs an episode that long)
    assert config.eval.max_steps == 500
    config.eval.max_steps = 30  # here: that the evaluation runs, not for how long
    result = Trainer(config, progress=False).fit()
    generated = list((tmp_path / "cache" / "vlamp").rglob("meta/info.json"))
    assert len(generated) == 1  # the suite's demonstrations, generated into the cache
    info = json.loads(generated[0].read_text())
    assert info["total_episodes"] == 4
    ev = result.eval
    assert [t["task"] for t in ev["per_task"]] == ["reach", "drawer-close"]
    assert ev["max_steps"] == 30 and set(ev["groups"]) == {"easy"}
    assert all(t["episodes"] == 1 for t in ev["per_task"])


@pytest.mark.slow
def test_a_suites_data_is_generated_once_for_processes_that_share_it(tmp_path, monkeypatch):
    from vlamp.train.data import with_dataset_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = load_config("mt10", ["dataset.tasks=drawer-close", "dataset.episodes_per_task=1",
                                  "dataset.image_size=16"])
    ready = with_dataset_path(config, progress=False)  # what the bench hands each run's process
    assert ready.dataset.tasks == "" and (tmp_path / "cache") in Path(ready.dataset.path).parents
    assert json.loads((Path(ready.dataset.path) / "meta" / "info.json").read_text())[
        "total_episodes"] == 1
    assert with_dataset_path(ready) is ready  # a path given: nothing generated, nothing changed
