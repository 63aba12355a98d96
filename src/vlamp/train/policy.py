"""A trained model as a closed-loop policy: observation in, action chunk (in the robot's units) out."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch

from vlamp.data.dataset import Normalizer
from vlamp.models.lora import add_lora
from vlamp.models.registry import build_model
from vlamp.models.tinyvla import TinyVLA
from vlamp.models.tokenizer import WordTokenizer
from vlamp.precision.hardware import resolve_device
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.plan import PrecisionPlan
from vlamp.precision.probe import model_device
from vlamp.sim.env import UNRECORDED_CAMERA, Observation


class VLAPolicy:
    """Wraps a :class:`TinyVLA` for :func:`vlamp.sim.evaluate.evaluate`.

    Args:
        model: The trained model (set up by ``mp``).
        tokenizer: The tokenizer it was trained with.
        stats: The dataset's ``meta/stats.json`` (to normalize states and unnormalize actions).
        mp: The precision object, for the forward pass's autocast.
        seed: Seeds the flow head's sampling noise.
    """

    def __init__(self, model: TinyVLA, tokenizer: WordTokenizer, stats: dict, mp: MixedPrecision,
                 seed: int = 0) -> None:
        self.model, self.tokenizer, self.mp = model, tokenizer, mp
        self.normalizer = Normalizer(stats)
        self.device = model_device(model)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._tokens: dict[str, torch.Tensor] = {}

    def reset(self, seed: int) -> None:
        """Seeds the sampling noise for an episode (the evaluation calls it with the episode's
        seed), so an episode's actions do not depend on the episodes run before it."""
        self.generator.manual_seed(int(seed))

    def __call__(self, obs: Observation) -> np.ndarray:
        if obs.instruction not in self._tokens:
            self._tokens[obs.instruction] = self.tokenizer.encode([obs.instruction]).to(self.device)
        image = torch.from_numpy(np.ascontiguousarray(obs.image)).to(self.device)
        image = image.permute(2, 0, 1)[None].float() / 255.0
        state = torch.from_numpy(self.normalizer.normalize_state(obs.state))[None].to(self.device)
        was_training = self.model.training
        self.model.eval()
        with self.mp.autocast():
            chunk = self.model.predict(image, state, self._tokens[obs.instruction], self.generator)
        self.model.train(was_training)
        actions = self.normalizer.unnormalize_action(chunk[0].float().cpu().numpy())
        return np.clip(actions, -1.0, 1.0)


@dataclasses.dataclass
class LoadedPolicy:
    """A policy read from a checkpoint, with what it was trained on (``camera``: ``corner`` for
    checkpoints written before the camera was recorded, all trained on images from there)."""

    policy: VLAPolicy
    config: dict
    image_size: int
    camera: str
    instructions: list[str]
    step: int


def load_policy(path: str, mode: str | None = None, use_ema: bool = True,
                device: str | torch.device | None = "auto") -> LoadedPolicy:
    """A closed-loop policy from a checkpoint (a ``step_*`` directory or a run directory, whose
    newest valid checkpoint is used).

    Args:
        path: Checkpoint or run directory.
        mode: Run the policy in this precision mode instead of the one it was trained in.
        use_ema: Use the EMA weights when the checkpoint has them.
        device: Where the policy computes (``auto``: CUDA when present); the simulator stays on
            the CPU.

    Returns:
        A :class:`LoadedPolicy`.

    Raises:
        VlampError: If no valid checkpoint is found.
    """
    from vlamp.models.config import ModelConfig, saved_model_config
    from vlamp.train.checkpoint import load_checkpoint

    dev = resolve_device(device)
    c = load_checkpoint(path)
    config = c.state["config"]
    saved = c.state["precision"].get("plan")
    if mode is None and saved is not None:  # the plan it was trained with, measured rules included
        mp = MixedPrecision(PrecisionPlan.from_dict(saved, where=f"checkpoint {c.path}"),
                            tf32=bool(c.state["precision"].get("tf32", False)))
    else:
        mp = MixedPrecision(mode or c.state["precision"]["mode"], config["precision"]["rules"] or None,
                            device=dev)
    model = build_model(ModelConfig(**saved_model_config(config["model"]))).to(dev)
    lora = (config.get("train") or {}).get("lora") or {}
    if lora.get("rank"):  # the adapters it was trained with (a merged checkpoint has none)
        add_lora(model, lora["targets"], int(lora["rank"]), float(lora["alpha"]))
    mp.setup(model)
    model.load_state_dict(c.model)
    ema = {k.removeprefix("ema."): v for k, v in c.train.items() if k.startswith("ema.")}
    if use_ema and ema:
        sd = model.state_dict()
        model.load_state_dict({**sd, **{k: v.to(sd[k].dtype) for k, v in ema.items()}})
    tokenizer = WordTokenizer.from_dict(c.state["tokenizer"])
    return LoadedPolicy(VLAPolicy(model, tokenizer, c.state["stats"], mp), config,
                        int(c.state["image_size"]), c.state.get("camera", UNRECORDED_CAMERA), list(c.state["tasks"]),
                        c.step)


def policy_recipe(path: str, mode: str | None = None, use_ema: bool = True,
                  device: str | torch.device | None = "auto") -> Callable[[], VLAPolicy]:
    """A picklable callable that loads the checkpoint's policy: what
    :func:`vlamp.sim.evaluate.evaluate` builds in each worker process (``workers=N``)."""
    return functools.partial(_loaded, path, mode, use_ema, device)


def _loaded(path: str, mode: str | None, use_ema: bool, device: str | torch.device | None) -> VLAPolicy:
    return load_policy(path, mode, use_ema, device=device).policy
