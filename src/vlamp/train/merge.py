"""A LoRA-trained checkpoint folded into a plain one that ``vlamp eval`` loads like any other."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from vlamp.models.config import ModelConfig, saved_model_config
from vlamp.models.lora import add_lora, frozen_bases, merge_lora
from vlamp.models.registry import build_model
from vlamp.precision.errors import VlampError
from vlamp.precision.freeze import FROZEN
from vlamp.precision.modes import get_mode
from vlamp.precision.policy import Policy
from vlamp.train import checkpoint as ckpt

MERGED = "lora-merged"  # the label of the rules keeping merged layers in FP32 storage


def merge_checkpoint(path: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Writes the checkpoint at ``path`` (or a run's newest) with its LoRA adapters folded into
    the adapted layers, ``W + alpha / rank * B A`` computed in FP32 from the EMA weights where the
    run kept them (as ``vlamp eval`` evaluates by default), as a run directory ``out``.

    The merged layers keep FP32 storage even in a mode that stores weights in low precision: the
    adapter's product is far below a BF16 weight's resolution, and rounding the merge into BF16
    would throw it away (openvla-oft#151).

    Returns:
        The new checkpoint's directory.

    Raises:
        VlampError: If the run was trained without adapters, or ``out`` already holds checkpoints.
    """
    c = ckpt.load_checkpoint(path)
    config = copy.deepcopy(c.state["config"])
    lora = (config.get("train") or {}).get("lora") or {}
    if not lora.get("rank"):
        raise VlampError(f"{c.path}: trained without LoRA adapters (train.lora.rank 0): nothing to merge")
    if ckpt.list_checkpoints(out):
        raise VlampError(f"{out} already holds checkpoints; choose another --out")
    model = build_model(ModelConfig(**saved_model_config(config["model"])))
    adapted = add_lora(model, lora["targets"], int(lora["rank"]), float(lora["alpha"]))
    weights = {k: v.float() for k, v in c.model.items()}
    ema = {k.removeprefix("ema."): v.float() for k, v in c.train.items() if k.startswith("ema.")}
    model.load_state_dict({**weights, **ema} if use_ema else weights)
    merge_lora(model)
    config["train"]["lora"] = {**lora, "rank": 0, "targets": []}
    precision = copy.deepcopy(c.state["precision"])
    if precision.get("plan"):
        precision["plan"] = _merged_plan(precision["plan"], adapted)
    state = {**c.state, "config": config, "precision": precision}
    return ckpt.save_checkpoint(out, c.step, state, model.state_dict(),
                                {"rng.torch": c.train["rng.torch"]}, keep_last=1)


def _merged_plan(plan: dict[str, Any], adapted: list[str]) -> dict[str, Any]:
    """The saved plan without the rules on the adapters' frozen bases (gone), plus FP32 storage
    for the merged layers where the mode stores weights in low precision."""
    bases = set(frozen_bases(adapted))
    rules = [r for r in plan.get("rules", [])
             if not (r.get("label") == FROZEN and r["pattern"] in bases)]
    mode = get_mode(plan["mode"])
    if mode.default_policy.param != torch.float32:
        keep = str(Policy(torch.float32, mode.compute_dtype, mode.compute_dtype))
        rules += [{"pattern": name, "policy": keep, "label": MERGED} for name in adapted]
    return {**plan, "rules": rules}


__all__ = ["merge_checkpoint"]
