"""Meta-World demonstrations in the LeRobot v3.0 layout, the reader, and closed-loop evaluation."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlamp import VlampError
from vlamp.data.dataset import ChunkDataset
from vlamp.data import generate as generate_module
from vlamp.data.generate import generate
from vlamp.data.lerobot import Episode, write_dataset
from vlamp.data.reader import read_dataset
from vlamp.sim.evaluate import ExpertPolicy, RandomPolicy, evaluate, wilson_interval

# one xdist group: the session's dataset fixture is generated once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("data_sim")]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ds"
    return generate("drawer-open", 2, out=root, workers=1, progress=False, image_size=32)


def test_round_trip_shapes_dtypes_and_layout(dataset):
    d = read_dataset(dataset)
    n = len(d)
    assert d.images.shape == (n, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.state.shape == (n, 4) and d.state.dtype == np.float32
    assert d.action.shape == (n, 4) and d.action.dtype == np.float32
    assert d.episode_index.dtype == np.int64 and d.num_episodes == 2
    assert d.tasks == ["open the drawer"] and set(d.task_index) == {0}
    assert np.abs(d.action).max() <= 1.0
    assert d.images.std() > 10  # a real rendering, not a blank frame
    info = json.loads((dataset / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 80
    assert info["total_frames"] == n and info["total_episodes"] == 2
    assert info["features"]["observation.image"] == {
        "dtype": "image", "shape": [32, 32, 3], "names": ["height", "width", "channels"]}
    assert info["features"]["observation.state"]["names"] == ["hand_x", "hand_y", "hand_z", "gripper"]
    eps = pq.read_table(dataset / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == [int((d.episode_index == i).sum()) for i in range(2)]
    assert eps[1]["dataset_from_index"] == eps[0]["dataset_to_index"] == eps[0]["length"]
    tasks = pq.read_table(dataset / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    stats = json.loads((dataset / "meta/stats.json").read_text())
    np.testing.assert_allclose(stats["action"]["mean"], d.action.mean(0), atol=1e-5)
    assert np.asarray(stats["observation.image"]["mean"]).shape == (3, 1, 1)
    for i in range(2):  # frame indices restart per episode; only successful episodes are kept
        assert list(d.frame_index[d.episode_index == i]) == list(range(eps[i]["length"]))
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_generation_is_deterministic(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "CHUNK", 1)  # two jobs over two processes, not one job
    again = generate("drawer-open", 2, out=tmp_path / "again", workers=2, progress=False, image_size=32)
    a, b = read_dataset(dataset), read_dataset(again)
    assert np.array_equal(a.action, b.action) and np.array_equal(a.images, b.images)


def test_a_worker_holds_one_simulator_at_a_time(tmp_path, monkeypatch):
    # MT50's 50 simulators held at once by each worker took 7-8 GB per worker
    import vlamp.sim.env as sim_env

    live, built = [], []

    class Counted(sim_env.MetaWorldEnv):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.append(self)
            built.append(len(live))

        def close(self):
            live.remove(self)
            super().close()

    monkeypatch.setattr(sim_env, "MetaWorldEnv", Counted)
    monkeypatch.setattr(generate_module, "CHUNK", 2)
    generate("handle-press,drawer-open", 3, out=tmp_path / "ds", image_size=16, workers=1,
             progress=False)
    assert max(built) == 1 and not live  # one at a time, and the last one closed
    assert len(built) == 4  # one per job: episodes 0-1 and 2 of each task


def test_chunks_are_padded_and_masked_at_episode_ends(dataset):
    d = read_dataset(dataset)
    ds = ChunkDataset(d, chunk=16)
    first_len = int((d.episode_index == 0).sum())
    item = ds[first_len - 3]  # three frames before the end of episode 0
    assert item["actions"].shape == (16, 4) and item["image"].shape == (3, 32, 32)
    assert item["action_mask"].tolist() == [True] * 3 + [False] * 13
    last = ds.normalize_action(d.action[first_len - 1])
    np.testing.assert_allclose(item["actions"][3:].numpy(), np.tile(last, (13, 1)), rtol=1e-5)
    all_actions = np.stack([ds[i]["actions"][0].numpy() for i in range(len(ds))])
    np.testing.assert_allclose(all_actions.mean(0), 0, atol=1e-4)  # normalized by the stats
    assert item["instruction"] == "open the drawer"
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert len(ChunkDataset(d, episodes=[1])) == len(d) - first_len


def test_reads_a_dataset_whose_camera_is_a_video_feature(dataset, tmp_path):
    import av

    src = read_dataset(dataset)
    root = tmp_path / "video_ds"
    shutil.copytree(dataset, root)
    info = json.loads((root / "meta/info.json").read_text())
    key = "observation.images.corner"
    info["features"].pop("observation.image")
    info["features"][key] = {"dtype": "video", "shape": [32, 32, 3],
                             "names": ["height", "width", "channels"],
                             "info": {"video.codec": "h264", "video.fps": 80}}
    info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    (root / "meta/info.json").write_text(json.dumps(info))
    data_file = root / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(data_file).drop_columns(["observation.image"]), data_file)
    video = root / f"videos/{key}/chunk-000/file-000.mp4"
    video.parent.mkdir(parents=True)
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=80)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        for img in src.images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    ep_file = root / "meta/episodes/chunk-000/file-000.parquet"
    eps = pq.read_table(ep_file).to_pylist()
    for e in eps:
        e[f"videos/{key}/chunk_index"], e[f"videos/{key}/file_index"] = 0, 0
        e[f"videos/{key}/from_timestamp"] = e["dataset_from_index"] / 80
        e[f"videos/{key}/to_timestamp"] = e["dataset_to_index"] / 80
    pq.write_table(pa.Table.from_pylist(eps), ep_file)
    d = read_dataset(root)
    assert d.camera_key == key and d.images.shape == src.images.shape
    assert np.abs(d.images.astype(int) - src.images.astype(int)).mean() < 3  # colour conversion only
    assert np.array_equal(d.action, src.action)
    streamed = read_dataset(root, stream=True)  # decoded once into a file, read per batch
    assert np.array_equal(streamed.images[np.arange(len(d))[::-1]], d.images[::-1])


def _copy(dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    return root


def test_bad_datasets_say_what_is_wrong(dataset, tmp_path):
    with pytest.raises(VlampError, match="no such directory"):
        read_dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlampError, match="not a LeRobot v3.0 dataset: missing meta/info.json"):
        read_dataset(tmp_path / "empty")
    root = _copy(dataset, tmp_path)
    (root / "meta/tasks.parquet").unlink()
    with pytest.raises(VlampError, match="missing meta/tasks.parquet"):
        read_dataset(root)
    shutil.rmtree(root)
    root = _copy(dataset, tmp_path)
    data_file = root / "data/chunk-000/file-000.parquet"
    data_file.write_bytes(data_file.read_bytes()[: 2000])
    with pytest.raises(VlampError, match="cannot read data parquet"):
        read_dataset(root)
    shutil.rmtree(root)
    root = _copy(dataset, tmp_path)
    t = pq.read_table(data_file := root / "data/chunk-000/file-000.parquet")
    actions = t.column("action").to_pylist()
    actions[5][2] = float("nan")
    t = t.set_column(t.schema.get_field_index("action"), "action",
                     pa.array(actions, t.schema.field("action").type))
    pq.write_table(t, data_file)
    with pytest.raises(VlampError, match="column 'action' has NaN/inf \\(1 values, first at frame 5\\)"):
        read_dataset(root)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(VlampError, match="codebase_version is 'v2.1'"):
        read_dataset(root)


def test_writer_never_leaves_a_half_written_dataset(tmp_path):
    ok = Episode(np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 4), np.float32),
                 np.zeros((3, 4), np.float32), "a")
    broken = Episode(np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 5), np.float32),
                     np.zeros((3, 4), np.float32), "b")
    with pytest.raises(VlampError, match=r"episode 1 \('b'\) has state/action widths \(5,\)/\(4,\), "
                                         r"the names give 4/4"):
        write_dataset(tmp_path / "ds", [ok, broken], fps=10, state_names="abcd", action_names="abcd")
    assert list(tmp_path.iterdir()) == []
    short = Episode(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 4), np.float32),
                    np.zeros((3, 4), np.float32), "c")
    with pytest.raises(VlampError, match=r"episode 1 \('c'\) has 2 images"):
        write_dataset(tmp_path / "ds", [ok, short], fps=10, state_names="abcd", action_names="abcd")
    assert list(tmp_path.iterdir()) == []
    write_dataset(tmp_path / "ds", [ok], fps=10, state_names="abcd", action_names="abcd")
    with pytest.raises(VlampError, match="already exists"):
        write_dataset(tmp_path / "ds", [ok], fps=10, state_names="abcd", action_names="abcd")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a parent that is a file: unwritable even for root
    with pytest.raises(VlampError, match="cannot write"):
        generate("reach", 1, out=blocker / "ds", workers=1, progress=False)


@pytest.mark.slow
def test_expert_scores_at_least_90_percent_on_the_default_suite():
    result = evaluate(ExpertPolicy(), episodes=2, progress=False)
    assert [t.task for t in result.tasks] == ["drawer-open", "drawer-close", "window-open",
                                              "window-close", "faucet-open", "faucet-close"]
    assert result.success_rate >= 0.9
    assert result.steps_per_s > 0 and result.as_dict()["episodes"] == 12


@pytest.mark.slow
def test_random_policy_scores_about_zero(tmp_path):
    gif = tmp_path / "rollout.gif"
    result = evaluate(RandomPolicy(seed=0), "drawer-open,window-close", episodes=2, max_steps=100,
                      progress=False, gif_path=gif)
    assert result.success_rate == 0.0
    assert all(t.mean_length == 100 for t in result.tasks)
    assert gif.stat().st_size > 1000


def test_wilson_interval():
    lo, hi = wilson_interval(10, 10)
    assert (lo, hi) == pytest.approx((0.7225, 1.0), abs=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("value", "fragment"), [
    ("", "MUJOCO_GL='' names no rendering backend; legal: egl, osmesa, glfw"),
    ("vulkan", "MUJOCO_GL='vulkan' names no rendering backend"),
    ("glfw", "MUJOCO_GL=glfw renders into a window and DISPLAY is not set"),
])
def test_a_bad_rendering_backend_is_one_line_before_any_simulator_starts(tmp_path, value, fragment):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env["MUJOCO_GL"] = value
    generate = ["data", "generate", "--tasks", "drawer-open", "--episodes", "1", "--out",
                str(tmp_path / "ds")]
    evaluate = ["eval", "--tasks", "drawer-open", "--episodes", "1"]
    for args in [evaluate if value == "vulkan" else generate]:  # both check before they start
        p = subprocess.run([sys.executable, "-m", "vlamp", *args], capture_output=True, text=True,
                           env=env, timeout=300)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
        assert fragment in p.stderr
    assert not (tmp_path / "ds").exists()
