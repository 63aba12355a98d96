"""Training samples from a LeRobot dataset: image, state, instruction and a future action chunk."""

from __future__ import annotations

import numpy as np
import torch

from vlamp.data.lerobot import ACTION_KEY, STATE_KEY
from vlamp.data.reader import LeRobotData

EPS = 1e-6


class Normalizer:
    """Zero mean, unit variance for states and actions, from a dataset's ``meta/stats.json``; the
    one place training samples and the deployed policy agree on units."""

    def __init__(self, stats: dict) -> None:
        s, a = stats[STATE_KEY], stats[ACTION_KEY]
        self.state_mean = np.asarray(s["mean"], np.float32)
        self.state_std = np.asarray(s["std"], np.float32) + EPS
        self.action_mean = np.asarray(a["mean"], np.float32)
        self.action_std = np.asarray(a["std"], np.float32) + EPS

    def normalize_state(self, s: np.ndarray) -> np.ndarray:
        return (s - self.state_mean) / self.state_std

    def normalize_action(self, a: np.ndarray) -> np.ndarray:
        return (a - self.action_mean) / self.action_std

    def unnormalize_action(self, a: np.ndarray) -> np.ndarray:
        return a * self.action_std + self.action_mean


class ChunkDataset(torch.utils.data.Dataset):
    """Frame ``i`` -> the observation at ``i`` and actions ``i .. i+H-1`` of the same episode.

    Near an episode's end the chunk is padded by repeating the last action and ``action_mask`` marks
    the real steps (ACT's convention). State and actions are normalized to zero mean and unit
    variance with the dataset's ``meta/stats.json``; images become float (3, H, W) in [0, 1].

    Args:
        data: A dataset from :func:`vlamp.data.reader.read_dataset`.
        chunk: Action-chunk length H.
        episodes: Keep only these episode indices (for a train/validation split).

    Each item is a dict with ``image`` (3,H,W) float32, ``state`` (S,) float32, ``task_index``
    int64, ``instruction`` str, ``actions`` (H,A) float32 and ``action_mask`` (H,) bool.
    """

    def __init__(self, data: LeRobotData, chunk: int = 16, episodes: list[int] | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.data, self.chunk = data, chunk
        self.normalizer = Normalizer(data.stats)
        self.normalize_state = self.normalizer.normalize_state
        self.normalize_action = self.normalizer.normalize_action
        self.unnormalize_action = self.normalizer.unnormalize_action
        keep = np.ones(len(data), bool) if episodes is None else np.isin(data.episode_index, episodes)
        self.rows = np.flatnonzero(keep)
        # Last frame of each frame's episode, so a chunk never crosses into the next episode.
        ep = data.episode_index
        ends = np.empty(len(ep), np.int64)
        boundaries = np.flatnonzero(np.diff(ep)) + 1
        for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(ep)]):
            ends[start:stop] = stop - 1
        self.episode_end = ends

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, object]:
        row = int(self.rows[i])
        end = int(self.episode_end[row])
        idx = np.minimum(np.arange(row, row + self.chunk), end)
        mask = np.arange(row, row + self.chunk) <= end
        d = self.data
        return {
            "image": torch.from_numpy(d.images[row]).permute(2, 0, 1).float().div_(255.0),
            "state": torch.from_numpy(self.normalize_state(d.state[row])),
            "task_index": torch.tensor(int(d.task_index[row])),
            "instruction": d.tasks[int(d.task_index[row])],
            "actions": torch.from_numpy(self.normalize_action(d.action[idx])),
            "action_mask": torch.from_numpy(mask),
        }

    def batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Items ``positions`` (indices into this dataset) collated into tensors in one gather:
        ``image`` (B,3,H,W) float32 in [0, 1], ``state``, ``task_index``, ``actions``,
        ``action_mask``. Much faster than a ``DataLoader`` over :meth:`__getitem__` on few cores."""
        rows = self.rows[np.asarray(positions, np.int64)]
        steps = rows[:, None] + np.arange(self.chunk)[None]
        ends = self.episode_end[rows][:, None]
        d = self.data
        images = torch.from_numpy(d.images[rows]).permute(0, 3, 1, 2).float().div_(255.0)
        return {
            "image": images,
            "state": torch.from_numpy(self.normalize_state(d.state[rows])),
            "task_index": torch.from_numpy(d.task_index[rows].astype(np.int64)),
            "actions": torch.from_numpy(self.normalize_action(d.action[np.minimum(steps, ends)])),
            "action_mask": torch.from_numpy(steps <= ends),
        }


def random_shift_offsets(n: int, pad: int = 4, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """The crop offsets :func:`random_shift` draws for ``n`` images: a ``(2, n)`` tensor of x
    and y offsets in ``[0, 2 * pad]``."""
    return torch.randint(0, 2 * pad + 1, (2, n), generator=generator)


def random_shift(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None,
                 offsets: torch.Tensor | None = None) -> torch.Tensor:
    """DrQ's augmentation: pad each image by replicating its border, then crop it back at a random
    offset (one per image; ``offsets`` from :func:`random_shift_offsets` to give them)."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="replicate")
    if offsets is None:
        offsets = random_shift_offsets(b, pad, generator)
    dx, dy = offsets.tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
