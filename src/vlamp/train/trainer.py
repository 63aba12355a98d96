"""The trainer: data, model and precision set up from a :class:`RunConfig`, then the loop (batches
-> ``train_step`` -> schedule, EMA, logs, validation, closed-loop evaluation, checkpoints)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlamp.data.dataset import ChunkDataset, random_shift, random_shift_offsets
from vlamp.data.generate import dataset_camera
from vlamp.data.reader import LeRobotData
from vlamp.io import check_writable
from vlamp.models.lora import adapt
from vlamp.models.registry import build_model
from vlamp.models.tokenizer import WordTokenizer
from vlamp.precision.errors import VlampError
from vlamp.precision.hardware import synchronize
from vlamp.precision.memory import PeakRSS, checkpoint_modules
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.plan import PrecisionPlan
from vlamp.precision.weight_update import UpdateSettings, mode_label
from vlamp.train import checkpoint as ckpt
from vlamp.train import distributed
from vlamp.train.budget import check_budget, uncached_refusal
from vlamp.train.config import RunConfig
from vlamp.train.config_io import save_config, to_dict
from vlamp.train.data import load_data, split_episodes
from vlamp.train.logs import RunLog, truncate_metrics
from vlamp.train.policy import VLAPolicy, policy_recipe
from vlamp.train.step import (
    EMA,
    Batch,
    compile_model,
    learning_rate,
    make_optimizer,
    measured_plan,
    to_device,
    train_step,
)


@dataclass
class TrainResult:
    """What a run did: per-step losses, validation and evaluation results, where it lives."""

    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    val_action_l1: float | None = None
    eval: dict[str, Any] | None = None
    seconds: float = 0.0  # the whole run, its closed-loop evaluations included
    eval_seconds: float = 0.0  # of which the closed-loop evaluations
    peak_bytes: int = 0  # the training steps' measured peak above the memory before the model


class Trainer:
    """Runs one training job described by a :class:`RunConfig`.

    Args:
        config: The run's configuration.
        data: An already loaded dataset (else ``config.dataset.path`` is read).
        progress: Show progress bars.

    Raises:
        VlampError: On bad configuration, an output directory that holds another run (without
            ``resume``), or a checkpoint of a different model.
    """

    def __init__(self, config: RunConfig, data: LeRobotData | None = None, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.run_dir = Path(config.output_dir)
        existing = ckpt.list_checkpoints(self.run_dir)
        if existing and not config.resume:
            raise VlampError(f"output_dir {str(self.run_dir)!r} already holds checkpoints; pass "
                             f"resume=true to continue it or choose another output_dir")
        if config.resume and not existing:
            raise VlampError(f"resume=true but {str(self.run_dir)!r} has no checkpoints")
        leftovers = [n for n in ("metrics.jsonl", "tb", "config.yaml") if (self.run_dir / n).exists()]
        if leftovers and not existing:
            raise VlampError(f"output_dir {str(self.run_dir)!r} holds an earlier run's "
                             f"{', '.join(leftovers)} but no checkpoint; a new run would mix its logs "
                             f"into them. Remove them or choose another output_dir")
        check_writable(self.run_dir)  # before minutes of loading, not after
        self.world, self.device = distributed.init(config.train.device)
        self.progress = progress and self.world.main
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        if data is None and not self.world.main:
            distributed.barrier(self.world)  # rank 0 generates the default dataset, once
        self.data = data if data is not None else load_data(config, self.progress)
        if data is None and self.world.main:
            distributed.barrier(self.world)
        self.image_size = int(self.data.images.shape[1])
        self.camera = dataset_camera(self.data.root)
        train_eps, val_eps = split_episodes(self.data, config.dataset.val_episodes)
        self.train_set = ChunkDataset(self.data, config.model.chunk, train_eps)
        self.val_set = ChunkDataset(self.data, config.model.chunk, val_eps) if val_eps else None

        resume_from = ckpt.latest_checkpoint(self.run_dir) if config.resume else None
        if resume_from is not None:
            self.tokenizer = WordTokenizer.from_dict(resume_from.state["tokenizer"])
        else:
            self.tokenizer = WordTokenizer.build(self.data.tasks, config.model.max_tokens)
        self.tokens_by_task = self.tokenizer.encode(self.data.tasks)
        m = config.model
        m.vocab_size, m.state_dim = len(self.tokenizer), int(self.data.state.shape[1])
        m.action_dim, m.image_size = int(self.data.action.shape[1]), self.image_size
        if resume_from is not None:
            ckpt.check_same_model(resume_from.state["config"]["model"], to_dict(config)["model"])
        config, self.predicted = check_budget(config, self.device, self._log_line)
        self.config = config
        self.peak = PeakRSS(self.device)  # the run's memory: what it holds above this
        torch.manual_seed(config.train.seed)
        self.rng = np.random.default_rng(config.train.seed)
        self.model = build_model(m).to(self.device)  # the same initial weights on every rank
        self.lora_bases = adapt(self.model, config.train.lora)  # frozen under their adapters
        self.mp = self._precision(resume_from)
        self.mp.setup(self.model)
        try:
            self.checkpointed = checkpoint_modules(self.model, config.train.checkpoint)
        except ValueError as e:
            raise VlampError(f"train.checkpoint: {e}") from None
        d = config.distributed
        wrapped = distributed.wrap(self.model, self.mp, d.strategy, d.reduce_dtype, self.world)
        self.optimizer = make_optimizer(self.model, config.train.lr, config.train.weight_decay)
        self.mp.setup(self.model, self.optimizer)
        self.forward = (compile_model(wrapped, config.train.compile_backend) if config.train.compile
                        else wrapped)
        self.ema = EMA(self.model, config.train.ema_decay, self.mp.master_weights) \
            if config.train.ema_decay else None
        self.step = 0
        self.applied_steps = 0
        if resume_from is not None:
            self._restore(resume_from)
        distributed.barrier(self.world)  # every rank checked the run directory before any writes

    def _predicted(self) -> dict[str, Any]:
        """The memory row's prediction: the budget's peak and its moment (``None`` without one)."""
        p = self.predicted
        return {"predicted_peak_bytes": getattr(p, "peak", None),
                "predicted_at": getattr(p, "moment", None)}

    def _log_line(self, line: str) -> None:
        if self.progress:
            tqdm.write(line)
        else:  # what the budget chose, and why, is printed either way
            print(line, file=sys.stderr)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step, over all ranks and micro-batches."""
        t = self.config.train
        return t.batch_size * t.grad_accum * self.world.size

    @property
    def num_params(self) -> int:
        """Parameters of the whole model (not of this rank's shards)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def label(self) -> str:
        """The mode with its update and optimizer state: ``bf16-true/kahan+8bit``."""
        return mode_label(self.mp.mode.name, self.config.precision.update,
                          self.config.precision.optimizer_state)

    @property
    def sharded(self) -> bool:
        return self.world.distributed and self.config.distributed.strategy == "fsdp"

    def _precision(self, resume_from: ckpt.Checkpoint | None) -> MixedPrecision:
        """The precision object: a resumed run keeps the plan it was trained with (so it is not
        measured again and trains on exactly as it would have); otherwise the plan is measured on
        this machine (``precision.measure``) or taken from the mode as is."""
        p = self.config.precision
        saved = resume_from.state["precision"].get("plan") if resume_from is not None else None
        settings = p.loss_scale.settings()
        common = {"scaler_settings": settings, "tf32": p.tf32, "diagnostics": p.diagnostics,
                  "freeze": [*self.config.train.freeze, *self.lora_bases],
                  "update": UpdateSettings(p.update, p.grad_accum, self.config.train.seed,
                                           p.optimizer_state, p.step_in_backward)}
        if saved is not None and p.mode in ("auto", saved.get("mode")):
            if self.predicted is not None and self.predicted.if_cached is not None:
                self.predicted = self.predicted.if_cached  # the plan is read, not measured
            plan = PrecisionPlan.from_dict(saved, where=f"checkpoint {resume_from.path}")
            return MixedPrecision(plan, None, p.scaler or None, **common)
        if p.measure and p.mode != "fp32":
            plan = None
            # a run that fits its budget only with its plan from the cache measures nothing
            cached_only = self.predicted is not None and not self.predicted.fits
            if self.world.main:  # measured once, on rank 0; every rank trains on its plan
                plan = measured_plan(self.model, self.example_batch(), p.mode, p, self._log_line,
                                     common["freeze"], cached_only)
            if self.world.distributed:
                plan = distributed.broadcast_json(plan and plan.to_dict(), self.world)
                plan = plan and PrecisionPlan.from_dict(plan, where="rank 0's measured plan")
            if plan is None:  # on every rank
                raise VlampError(uncached_refusal(self.config, self.device, self.predicted))
            if cached_only:
                self.predicted = self.predicted.if_cached
            return MixedPrecision(plan, None, p.scaler or None, **common)
        return MixedPrecision(p.mode, p.rules or None, p.scaler or None, device=self.device, **common)

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        optim_tensors, optim_meta = ckpt.optimizer_to_flat(self.optimizer)
        state, precision_tensors = self._policy_state()
        tensors = {**optim_tensors, **precision_tensors, "rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            tensors.update(self.ema.state_dict())
        return {**state, "optimizer": optim_meta, "numpy_rng": self.rng.bit_generator.state}, tensors

    def _policy_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The JSON part of a checkpoint that :func:`load_policy` reads (config, tokenizer, dataset
        stats, the precision plan and state), and the precision tensors apart (FP32 masters as
        ``master.NAME``, Kahan buffers and the rounding generator as ``update.*``)."""
        precision = self.mp.state_dict()
        tensors = {**{f"master.{k}": v for k, v in precision.pop("master_weights").items()},
                   **{f"update.{k}": v for k, v in precision.pop("update_tensors").items()}}
        return {"format": ckpt.FORMAT, "applied_steps": self.applied_steps,
                "config": to_dict(self.config), "tokenizer": self.tokenizer.to_dict(),
                "stats": self.data.stats, "tasks": list(self.data.tasks),
                "image_size": self.image_size, "camera": self.camera, "precision": precision}, tensors

    def save(self) -> Path | None:
        """Writes a checkpoint (rank 0; the other ranks help gather sharded tensors). Returns its
        directory on rank 0, ``None`` elsewhere."""
        state, tensors = self._state()
        model, tensors = distributed.gather(self.model.state_dict()), distributed.gather(tensors)
        path = None
        if self.world.main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, state, model, tensors,
                                        keep_last=self.config.train.keep_last)
        distributed.barrier(self.world)
        return path

    def _restore(self, c: ckpt.Checkpoint) -> None:
        note = ckpt.resume_note(c.state["precision"], self.mp.mode.name, self.mp.settings.method)
        if note:
            warnings.warn(note, stacklevel=2)
        switched = note is not None
        masters = {k.removeprefix("master."): v for k, v in c.train.items() if k.startswith("master.")}
        # The most precise copy of each weight: its FP32 master where the run kept one, so a switch
        # between modes (bf16-true -> fp16-true, -true -> mixed) carries the trained weights over.
        exact = {**c.model, **{k: v for k, v in masters.items() if k in c.model}}
        if switched:  # and w + c where the run kept Kahan buffers (kept as they are otherwise)
            exact.update(ckpt.kahan_weights(c.model, c.train))
        if self.sharded:  # full tensors from the file; each rank keeps its shard
            exact = distributed.shard_like(exact, self.model.state_dict())
        try:
            self.model.load_state_dict(exact, strict=True)
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"{c.path}: model weights do not fit: {str(e).splitlines()[0]}") from None
        ckpt.optimizer_from_flat(self.optimizer, c.train, c.state["optimizer"])
        if self.sharded:
            distributed.shard_optimizer_state(self.optimizer)
        update = {k.removeprefix("update."): v for k, v in c.train.items() if k.startswith("update.")}
        self.mp.load_state_dict({**c.state["precision"], "master_weights": masters,
                                 "update_tensors": update})
        if switched:
            self.mp.sync_masters(exact)
        if self.ema is not None:
            if any(k.startswith("ema.") for k in c.train):
                self.ema.load_state_dict(c.train)
            else:
                warnings.warn("the checkpoint has no EMA weights; the average starts from the "
                              "current weights", stacklevel=2)
        torch.set_rng_state(c.train["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in c.train:
            torch.cuda.set_rng_state(c.train["rng.cuda"], self.device)
        self.rng.bit_generator.state = c.state["numpy_rng"]
        self.step, self.applied_steps = c.step, int(c.state["applied_steps"])
        if self.world.main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    # -- the loop --------------------------------------------------------------------------------
    def example_batch(self) -> Batch:
        """A real training batch (the first samples, not augmented) drawn without touching the
        run's random streams: for measuring, not training."""
        return self._batch(np.arange(self.config.train.batch_size) % len(self.train_set), False)

    def _batch(self, positions: np.ndarray, augment: bool) -> Batch:
        dataset = self.train_set
        b = dataset.batch(positions)
        if augment:
            # Offsets drawn for the whole batch of all ranks (the same stream on each), this
            # rank's slice used: N ranks augment exactly as one process does.
            n, rank = len(positions), self.world.rank
            shifts = random_shift_offsets(n * self.world.size)[:, rank * n:(rank + 1) * n]
            b["image"] = random_shift(b["image"], offsets=shifts)
        b["tokens"] = self.tokens_by_task[b["task_index"]]
        return to_device(b, self.device)

    def fit(self, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Trains to ``train.steps`` (from the resumed step, if any), evaluating on the way.

        Args:
            on_step: Called with the step count after each step and its logging, validation,
                evaluation and checkpoint (the benchmark pauses runs there to interleave them).
        """
        c, t = self.config, self.config.train
        if self.world.main:  # rank 0 logs; the other ranks only train
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(c, self.run_dir / "config.yaml")
        log = RunLog(self.run_dir if self.world.main else None, purge_step=self.step)
        result = TrainResult(self.run_dir, t.steps)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {self.label}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        start, window_t, window_n = time.perf_counter(), time.perf_counter(), 0
        measured_all = self.step > 0  # a resumed run's peak includes loading the checkpoint
        clip = t.clip_grad_norm or None
        try:
            while self.step < t.steps:
                lr = learning_rate(self.applied_steps, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                positions = self.rng.integers(0, len(self.train_set), size=self.effective_batch)
                batches = [self._batch(chunk, c.dataset.augment)
                           for chunk in distributed.my_share(positions, t.grad_accum, self.world)]
                t0 = time.perf_counter()
                shares = distributed.loss_shares([b["action_mask"] for b in batches], self.world)
                with distributed.own_noise(self.world, t.seed, self.step, self.device):
                    r = train_step(self.forward, batches, self.mp, self.optimizer, clip, shares)
                synchronize(self.device)
                result.step_times.append(time.perf_counter() - t0)
                if not measured_all:  # the training steps' peak, before validation or a save
                    result.peak_bytes = max(result.peak_bytes, self.peak.read())
                self.step += 1
                window_n += len(positions)  # samples of all ranks
                if not r.outcome.skipped:
                    self.applied_steps += 1
                    if self.ema is not None:
                        self.ema.update()
                result.losses.append(r.loss)
                if self.mp.last_diagnostics is not None:
                    log.diagnostics({**self.mp.last_diagnostics, "step": self.step})
                result.scales.append(r.outcome.scale)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    now = time.perf_counter()
                    rate = window_n / max(now - window_t, 1e-9)
                    window_t, window_n = now, 0
                    row = {"step": self.step, "loss": r.loss, "lr": lr, "loss_scale": r.outcome.scale,
                           "skipped_steps": self.mp.skipped_steps, "grad_norm": r.outcome.grad_norm,
                           "samples_per_s": rate, "step_time_s": result.step_times[-1]}
                    log.row("train", row)
                    bar.set_postfix(loss=f"{r.loss:.4f}", scale=f"{r.outcome.scale:g}",
                                    skipped=self.mp.skipped_steps, samples_s=f"{rate:.0f}")
                bar.update()
                last = self.step == t.steps
                if not measured_all and self._busy(self.step):  # logged before a save can fail
                    measured_all = True
                    log.row("memory", {"step": self.step, "peak_bytes": result.peak_bytes,
                                       **self._predicted()})
                if self.val_set is not None and ((t.val_every and self.step % t.val_every == 0) or last):
                    result.val_action_l1 = self.validate()
                    log.row("val", {"step": self.step, "action_l1": result.val_action_l1})
                    self._progress_line(r.loss, result)
                if (c.eval.every and self.step % c.eval.every == 0) or (last and c.eval.final):
                    began = time.perf_counter()
                    result.eval = self.evaluate()
                    result.eval_seconds += time.perf_counter() - began
                    log.row("eval", {"step": self.step,
                                     "success_rate": result.eval["success_rate"]})
                if (t.save_every and self.step % t.save_every == 0) or last:
                    self.save()
                if on_step is not None:
                    on_step(self.step)
        finally:
            bar.close()
            log.close()
        result.skipped_steps = self.mp.skipped_steps
        result.seconds = time.perf_counter() - start
        return result

    def _progress_line(self, loss: float, result: TrainResult) -> None:
        """At a validation, a line that a log file of a long run shows as it goes."""
        if self.world.main:
            times = sorted(result.step_times)
            self._log_line(f"step {self.step}/{self.config.train.steps}: loss {loss:.4f}, validation "
                           f"action L1 {result.val_action_l1:.4f}, {times[len(times) // 2]:.3g} s/step")

    def _busy(self, step: int) -> bool:
        """Whether anything but training runs after ``step`` (validation, evaluation, a save)."""
        t, e = self.config.train, self.config.eval
        return step == t.steps or any(n and step % n == 0 for n in (t.save_every, t.val_every, e.every))

    def eval_weights(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights when averaging, else ``None`` (the live weights)."""
        return self.ema.weights() if self.ema is not None else None

    @torch.no_grad()
    def validate(self, batch_size: int | None = None) -> float:
        """Mean absolute action error on the validation episodes (normalized units, real steps), in
        batches of the training micro-batch unless ``batch_size`` is given: a batch the memory
        budget was checked for (a large model's batch of 256 could outgrow it)."""
        assert self.val_set is not None
        batch_size = batch_size or self.config.train.batch_size
        with _swapped(self.model, self.eval_weights()):
            self.model.eval()
            err, count = 0.0, 0.0
            g = torch.Generator(self.device).manual_seed(0)
            for s in range(0, len(self.val_set), batch_size):
                b = self.val_set.batch(np.arange(s, min(s + batch_size, len(self.val_set))))
                b = to_device({**b, "tokens": self.tokens_by_task[b["task_index"]]}, self.device)
                with self.mp.autocast():
                    pred = self.model.predict(b["image"], b["state"], b["tokens"], g)
                w = b["action_mask"].unsqueeze(-1).float()
                err += float(((pred.float() - b["actions"]).abs() * w).sum())
                count += float(w.sum()) * pred.shape[-1]
            self.model.train()
        return err / max(count, 1.0)

    def evaluate(self) -> dict[str, Any]:
        """Closed-loop success in the simulator on the dataset's tasks (rank 0; the others wait).

        With ``eval.workers`` other than 1 the tasks are spread over processes, each building the
        policy from a temporary checkpoint of the weights evaluated (see
        :func:`vlamp.sim.evaluate.evaluate`); a stand-in precision object (the bench's torch.amp
        baseline) is evaluated in this process."""
        from vlamp.sim.evaluate import evaluate
        from vlamp.sim.tasks import tasks_for_instructions

        tasks = [task.name for task in tasks_for_instructions(self.data.tasks)]
        e = self.config.eval
        workers = min(e.workers or os.cpu_count() or 1, len(tasks))
        weights = self.eval_weights()
        if self.sharded:  # whole weights on rank 0, from the gathered shards
            weights = distributed.gather(weights if weights is not None else self.model.state_dict())
        result = None
        if self.world.main:
            run = dict(replan_every=e.replan_every, ensemble=e.ensemble, image_size=self.image_size,
                       camera=self.camera, max_steps=e.max_steps or None, progress=self.progress)
            if workers > 1 and isinstance(self.mp, MixedPrecision):
                with tempfile.TemporaryDirectory(prefix="vlamp-eval-") as tmp:
                    path = self._policy_checkpoint(tmp, weights)
                    recipe = policy_recipe(str(path), use_ema=False, device=self.device)
                    res = evaluate(recipe, tasks, e.episodes, workers=workers, **run)
            else:
                model, mp = self.model, self.mp
                if self.sharded:
                    model = self._unsharded_copy()
                    mp = MixedPrecision(self.mp.plan, tf32=self.mp.tf32)
                    mp.setup(model)
                with _swapped(model, weights):
                    res = evaluate(VLAPolicy(model, self.tokenizer, self.data.stats, mp), tasks,
                                   e.episodes, **run)
            result = res.as_dict()
        return distributed.broadcast_json(result, self.world)  # the other ranks waited here

    def _policy_checkpoint(self, directory: str, weights: dict[str, torch.Tensor] | None) -> Path:
        """A checkpoint holding only what :func:`load_policy` reads: these weights (default the
        live ones), the config, the tokenizer, the dataset stats and the precision plan."""
        state = {**self._policy_state()[0], "optimizer": {}, "numpy_rng": {}}
        model = weights if weights is not None else self.model.state_dict()
        return ckpt.save_checkpoint(directory, self.step, state, model,
                                    {"rng.torch": torch.get_rng_state()}, keep_last=1)

    def _unsharded_copy(self) -> torch.nn.Module:
        """A plain (unsharded) model of the same config on this rank's device: its weights are
        loaded by the caller. Built without drawing from the training's random stream (only
        rank 0 builds it; the ranks' streams must stay the same)."""
        with torch.random.fork_rng(devices=[]):
            return build_model(self.config.model).to(self.device)


class _swapped:
    """Temporarily loads other weights (the EMA) into a model."""

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> None:
        self.model, self.weights, self.saved = model, weights, None

    def __enter__(self) -> None:
        if self.weights is not None:
            self.saved = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.weights)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.model.load_state_dict(self.saved)
