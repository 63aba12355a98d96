"""Frames that stay on disk: the streamed reader gives the batches the in-memory one gives, its
decoded file is reused, rebuilt when stale and pruned when its dataset is gone, and reading
batches from it does not grow the process's memory."""

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from vlamp.data.dataset import ChunkDataset
from vlamp.data.frames import FrameStore
from vlamp.data.reader import read_dataset
from vlamp.train.config_io import load_config
from vlamp.train.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture
def frames_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vlamp" / "frames"


def test_streamed_and_in_memory_readers_give_identical_batches(tiny_dataset, frames_cache):
    memory, streamed = read_dataset(tiny_dataset), read_dataset(tiny_dataset, stream=True)
    assert isinstance(memory.images, np.ndarray) and isinstance(streamed.images, FrameStore)
    assert streamed.images.shape == memory.images.shape
    assert len(list(frames_cache.glob("*.npy"))) == 1
    a, b = ChunkDataset(memory, 4), ChunkDataset(streamed, 4)
    positions = np.random.default_rng(0).integers(0, len(a), 50)
    ba, bb = a.batch(positions), b.batch(positions)
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert torch.equal(a[7]["image"], b[7]["image"])
    for k in ("state", "action", "episode_index", "frame_index", "task_index"):
        assert np.array_equal(getattr(memory, k), getattr(streamed, k))


def test_training_on_streamed_frames_is_the_same_training(tiny_dataset, frames_cache, tmp_path):
    def losses(stream):
        cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / f"run-{stream}", "fp32",
                                               f"dataset.stream={stream}", "train.steps=3"))
        t = Trainer(cfg, progress=False)
        assert isinstance(t.data.images, FrameStore) == stream
        return t.fit().losses
    assert losses(True) == losses(False)


def test_the_decoded_file_is_reused_rebuilt_when_stale_and_pruned_with_its_dataset(
        tiny_dataset, frames_cache, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    first = read_dataset(root, stream=True).images
    built = first.path.stat().st_mtime_ns
    assert read_dataset(root, stream=True).images.path.stat().st_mtime_ns == built  # reused
    with open(first.path, "r+b") as f:  # a build cut short
        f.truncate(first.path.stat().st_size - 100)
    again = read_dataset(root, stream=True).images
    assert again.path == first.path and again.path.stat().st_size == again.offset + again.nbytes
    data_file = next(root.glob("data/*/*.parquet"))
    os.utime(data_file, ns=(built + 10**9, built + 10**9))  # the dataset changed: a new file
    changed = read_dataset(root, stream=True).images
    assert changed.path != first.path and np.array_equal(changed[[0, 5]], first[[0, 5]])
    assert first.path.exists()
    shutil.rmtree(root)
    read_dataset(tiny_dataset, stream=True)  # building another store prunes the orphans
    assert not first.path.exists() and not changed.path.exists()


def test_frame_store_indexing_pickling_and_errors(tiny_dataset, frames_cache):
    store = read_dataset(tiny_dataset, stream=True).images
    full = np.asarray(store)
    assert np.array_equal(store[3], full[3]) and np.array_equal(store[-1], full[-1])
    assert np.array_equal(store[[4, 1, 4]], full[[4, 1, 4]])
    again = pickle.loads(pickle.dumps(store))  # a DataLoader worker's copy reopens the file
    assert np.array_equal(again[[2, 0]], full[[2, 0]])
    with pytest.raises(IndexError, match="out of range"):
        store[[len(store)]]


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_reading_batches_does_not_grow_memory_with_the_dataset(tmp_path):
    """A 768 MiB store (a sparse file: no disk used) read in 500 random batches of 64: the
    process's own memory grows by about one batch, not by what was read."""
    path = tmp_path / "big.npy"
    shape = (65536, 64, 64, 3)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.truncate(f.tell() + int(np.prod(shape)))
    store = FrameStore(path)
    rng = np.random.default_rng(0)
    store[rng.integers(0, shape[0], 64)]
    before = _rss_anon_mib()
    read = 0
    for _ in range(500):
        read += store[rng.integers(0, shape[0], 64)].nbytes
    assert read / 2**20 > 350  # more than 40% of the file went through
    assert _rss_anon_mib() - before < 20
