"""Run by tests/test_distributed.py under real torchrun (gloo, CPU): mixed precision across ranks.

For each strategy (DDP, FSDP2) and mode (bf16-mixed, fp16-mixed) every rank trains a tiny TinyVLA
on its half of each batch, and also, alone, a reference copy on the whole batch (what one process
does). Then, in fp16-mixed, one rank's gradient is made inf before the step. Each rank writes what
it saw to ``OUT/rank<r>.json``; the test compares ranks and the reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from vlamp.models.config import ModelConfig
from vlamp.models.tinyvla import TinyVLA
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.verify import trace_compute_dtypes
from vlamp.train import distributed
from vlamp.train.step import train_step

CONFIG = dict(vocab_size=50, state_dim=39, action_dim=4, image_size=32, chunk=4, dim=32, depth=2,
              heads=2, text_layers=1, channels=[8, 16])
STEPS, BATCH = 4, 8


def build(mode: str, world: distributed.World | None, strategy: str, reduce: str = "fp32"):
    torch.manual_seed(0)
    model = TinyVLA(ModelConfig(**CONFIG))
    mp = MixedPrecision(mode)
    mp.setup(model)
    forward = model if world is None else distributed.wrap(model, mp, strategy, reduce, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mp.setup(model, opt)
    return model, forward, mp, opt


def half(batch: dict, world: distributed.World) -> dict:
    n = BATCH // world.size
    return {k: v[world.rank * n:(world.rank + 1) * n] for k, v in batch.items()}


def main(out: str) -> None:
    world, _ = distributed.init("cpu")
    torch.set_num_threads(1)
    report: dict = {"rank": world.rank, "runs": {}}
    cases = [(strategy, mode, "fp32") for strategy in ("ddp", "fsdp")
             for mode in ("bf16-mixed", "fp16-mixed")]
    cases += [(strategy, "bf16-mixed", "bf16") for strategy in ("ddp", "fsdp")]  # halved traffic
    for strategy, mode, reduce in cases:
        model, forward, mp, opt = build(mode, world, strategy, reduce)
        ref_model, _, ref_mp, ref_opt = build(mode, None, strategy)
        losses, ref_losses = [], []
        for step in range(STEPS):
            batch = ref_model.example_batch(BATCH, seed=step)
            batch["action_mask"][: BATCH // 2, -1] = False  # ranks hold unequal valid steps
            shares = distributed.loss_shares([half(batch, world)["action_mask"]], world)
            losses.append(train_step(forward, [half(batch, world)], mp, opt, 1.0, shares).loss)
            ref_losses.append(train_step(ref_model, [batch], ref_mp, ref_opt, 1.0).loss)
        run = {"losses": losses, "ref_losses": ref_losses, "scale": mp.scale,
               "notes": mp.parallel_notes}
        if strategy == "fsdp" and mode == "bf16-mixed" and reduce == "fp32":
            batch = half(ref_model.example_batch(BATCH, seed=99), world)

            def step() -> None:
                with mp.autocast():
                    loss = forward(batch)
                mp.backward(loss)

            def ref_step() -> None:
                with ref_mp.autocast():
                    loss = ref_model(batch)
                ref_mp.backward(loss)

            for key, (m, fn, o) in {"dtypes": (model, step, opt),
                                    "ref_dtypes": (ref_model, ref_step, ref_opt)}.items():
                seen = trace_compute_dtypes(m, fn, backward=True)
                o.zero_grad(set_to_none=True)
                run[key] = {k: sorted(str(d) for d in v) for k, v in seen.items()}
        if mode == "fp16-mixed":  # (reduced in fp32)
            # An overflow on one rank only, after the gradients were reduced.
            before = mp.scale
            batch = half(ref_model.example_batch(BATCH, seed=7), world)
            with mp.autocast():
                loss = forward(batch)
            mp.backward(loss)
            if world.rank == 1:
                grad = next(p.grad for p in model.parameters() if p.grad is not None)
                grad = grad.to_local() if hasattr(grad, "to_local") else grad
                grad.view(-1)[0] = float("inf")
            weights = [p.detach().clone() for p in model.parameters()]
            outcome = mp.step(opt, clip_grad_norm=None)
            run["overflow"] = {
                "skipped": outcome.skipped, "scale_before": before, "scale_after": mp.scale,
                "weights_unchanged": all(torch.equal(a, b) for a, b in
                                         zip(weights, (p.detach() for p in model.parameters()))),
            }
        key = f"{strategy}/{mode}" if reduce == "fp32" else f"{strategy}+{reduce}-reduce/{mode}"
        report["runs"][key] = run
    with open(os.path.join(out, f"rank{world.rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1])
