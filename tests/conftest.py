import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on pytest-xdist workers sharing the cores: one thread each, and for the
    # processes its tests start (they read OMP_NUM_THREADS), so that no worker's OpenMP threads
    # spin waiting for a core the other worker holds. A test that asks for threads still gets them.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Fixtures whose data the simulator renders (or whose tests start torchrun or bench processes):
# every test that takes one is an integration test, marked slow by construction.
SIMULATOR_FIXTURES = {"tiny_dataset", "dataset", "runs", "cache"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SIMULATOR_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Two paired tasks (same scene, different instruction), 3 expert episodes each, 32x32 images."""
    from vlamp.data.generate import generate

    root = tmp_path_factory.mktemp("tiny") / "ds"
    return generate("drawer-open,drawer-close", 3, out=root, workers=1, progress=False, image_size=32)


TINY_MODEL = ["model.dim=32", "model.depth=1", "model.heads=2", "model.text_layers=1",
              "model.channels=[8,8]", "model.chunk=4"]


def tiny_overrides(dataset, out, mode="fp32", *more):
    """Overrides for a seconds-long run of a tiny TinyVLA on the tiny dataset."""
    return [f"dataset.path={dataset}", f"output_dir={out}", f"precision.mode={mode}",
            "train.steps=6", "train.batch_size=8", "train.log_every=1", "train.save_every=3",
            "train.val_every=3", "train.warmup_steps=2", "dataset.val_episodes=1",
            "eval.final=false", "precision.measure=false",
            # Augmentation is off by default; on here so that every resume and rank-slicing test
            # also covers its random draws (the path with more state to get right).
            "dataset.augment=true", *TINY_MODEL, *more]


def assert_resume_is_bit_exact(full, run, *more):
    """Copies the finished run ``full`` without its last checkpoint (step 6), resumes it with
    ``run(out, *more, "resume=true")`` and checks the last checkpoint's files are the same bytes."""
    import shutil

    part = full.parent / f"{full.name}-resumed"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000006")
    run(part, *more, "resume=true")
    for name in ("model.safetensors", "train.safetensors"):
        a = (full / "checkpoints" / "step_0000006" / name).read_bytes()
        assert a == (part / "checkpoints" / "step_0000006" / name).read_bytes(), name


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``vlamp ARGS`` in this process, through the console script's own ``main`` (its error
    handling included): exit code, stdout, stderr. For checks of what a command refuses before
    it loads anything; a fresh interpreter would add seconds of imports to each."""
    from vlamp.cli.main import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own errors exit
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err

