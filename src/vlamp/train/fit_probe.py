"""The measurements a memory prediction needs, made on shallow copies of the model.

A stack of identical layers saves the same activations and takes the same time per layer, so a
model of one layer per stack, and copies with one more layer in each stack, measure everything
the full model would need per layer; the full model's figure is the base plus each stack's
per-layer figure times its remaining layers. Each copy is measured at micro-batches of 1 and 2
(what grows with the batch, and what does not: autocast's low-precision copies of weights).
The copies are frozen, adapted and planned as the run is (``train.freeze``, ``train.lora``, and
the plan the trainer measures from ``precision``: speed rules, lean islands): a frozen tower saves
nothing for the backward (on the default TinyVLA at batch 8, frozen vision and text towers save
10.5 MiB against 24.6 MiB trained), and a lean island's consumers save low-precision tensors.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Sequence

import torch

from vlamp.models.config import ModelConfig
from vlamp.models.lora import adapt
from vlamp.models.registry import BLOCKS, build_model, stack_depths
from vlamp.precision.errors import VlampError
from vlamp.precision.memory import ActivationMeter, PeakRSS, checkpoint_modules
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.plan import PrecisionPlan, plan_for
from vlamp.precision.probe import state_kept
from vlamp.precision.weight_update import UpdateSettings
from vlamp.train.config import LoraConfig, PrecisionConfig
from vlamp.train.step import make_optimizer, measured_plan, to_device, train_step


@dataclasses.dataclass
class Measured:
    """One shallow copy's figures: activations (bytes) and step time (s) at micro-batch 1 and 2,
    without and with checkpointing of every block; and the plan it trained on
    (:meth:`PrecisionPlan.to_dict`); where that plan was measured, what the measurement's FP32
    passes save (bytes at micro-batch 1 and 2: the model in FP32, frozen as the run freezes it)."""

    acts: dict[tuple[bool, int], float]
    seconds: dict[int, float]  # at micro-batch 1 and the run's batch
    plan: dict | None = None
    fp32_acts: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModeProbe:
    """A mode's measurements, extrapolated to the full model.

    Attributes:
        mode: The precision mode.
        depths: Layers per stack of the full model.
        base: The one-layer-per-stack copy's figures.
        deeper: Stack -> the copy with one more layer there.
        runtime_bytes: The probe's measured peak beyond the tensors counted (allocator, runtime);
            set by :func:`vlamp.train.fit.probe`.
        state8_seconds_per_param: Extra step time per parameter of 8-bit moments (measured).
        params: Parameters of the full model.
        probe_peak: The one-layer copy's measured peak over its steps at micro-batch 2 (bytes
            above the process's resident memory before it was built).
    """

    mode: str
    depths: dict[str, int]
    base: Measured
    deeper: dict[str, Measured]
    runtime_bytes: float = 0.0
    state8_seconds_per_param: float = 0.0
    params: int = 0
    probe_peak: float = 0.0

    def _full(self, get: Callable[[Measured], float]) -> float:
        return get(self.base) + sum(self._layer(get, s) * (n - 1) for s, n in self.depths.items())

    def _at(self, get: Callable[[Measured, int], float], batch: int, at: tuple[int, int] = (1, 2)
            ) -> float:
        """The full model's figure at ``batch``, on the line through the figures at ``at``."""
        lo, hi = at
        one, two = self._full(lambda m: get(m, lo)), self._full(lambda m: get(m, hi))
        slope = (two - one) / (hi - lo) if hi != lo else 0.0
        return max(0.0, one + slope * (batch - lo))

    def activations(self, batch: int, checkpoint: bool) -> float:
        """Bytes saved for the backward at micro-batch ``batch``; with checkpointing, plus the
        largest layer's activations, alive while it is recomputed."""
        saved = self._at(lambda m, b: m.acts[(checkpoint, b)], batch)
        if checkpoint and self.deeper:
            saved += max(self._layer(lambda m: m.acts[(False, 2)], s) * batch / 2 for s in self.deeper)
        return saved

    def measured_activations(self, batch: int) -> float:
        """Bytes the plan's measurement saves at most in one forward at micro-batch ``batch``: its
        FP32 passes' or the mode's, whichever is more (the mode's where the probe's plan was not
        measured)."""
        low = self.activations(batch, checkpoint=False)
        if not self.base.fp32_acts:
            return low
        return max(low, self._at(lambda m, b: m.fp32_acts.get(b, 0.0), batch))

    def _layer(self, get: Callable[[Measured], float], stack: str) -> float:
        if stack not in self.deeper:  # not measured (see :func:`vlamp.train.fit.unmeasured`)
            return 0.0
        return max(0.0, get(self.deeper[stack]) - get(self.base))

    def step_seconds(self, candidate) -> float:
        """Expected step time: ``grad_accum`` micro-batches' forward and backward, the update;
        checkpointing adds one more forward of the blocks (a third of their time)."""
        at = (1, max(self.base.seconds))
        micro = self._at(lambda m, b: m.seconds[b], candidate.micro_batch, at)
        if candidate.checkpoint and self.deeper:
            per_layer = self._at(lambda m, b: sum(self._layer(lambda x: x.seconds[b], s) * n
                                                  for s, n in self.depths.items()),
                                 candidate.micro_batch, at)
            micro += per_layer / 3
        extra = self.state8_seconds_per_param * self.params if candidate.optimizer_state == "8bit" else 0
        return micro * candidate.grad_accum + extra


def probe_mode(config: ModelConfig, mode: str, batch: int,
               log: Callable[[str], None] | None = None, threads: int | None = None,
               device: torch.device | str = "cpu", frozen: Sequence[str] = (),
               lora: LoraConfig | None = None, precision: PrecisionConfig | None = None
               ) -> ModeProbe:
    """Measures ``mode`` on the shallow copies of ``config``'s model (see the module's text) on
    ``device``, in a fresh process: its peak is measured from a clean start, as a run's is.
    ``frozen``, ``lora`` and ``precision`` (``train.freeze``, ``train.lora``, the run's precision
    settings) freeze, adapt and plan the copies as the trainer does the model; without
    ``precision``, the mode's plan as it is."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if log:
        log(f"fit: probing {mode} on one layer per stack, then one more in each")
    # An executor, not a Pool: a Pool waits forever for a worker the OOM killer took.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_probe_here, config, mode, batch, threads or torch.get_num_threads(),
                               str(device), tuple(frozen), lora, precision).result()
        except BrokenProcessPool:
            raise VlampError(f"the probe of {mode} died before it finished (killed for "
                             f"memory?); leave the mode out with --modes, or free memory") from None


def _probe_here(config: ModelConfig, mode: str, batch: int, threads: int, device: str,
                frozen: tuple[str, ...] = (), lora: LoraConfig | None = None,
                precision: PrecisionConfig | None = None) -> ModeProbe:
    torch.set_num_threads(threads)
    depths = stack_depths(config)
    base = {s: 1 for s in depths}
    peak = PeakRSS(device)
    measured_base = _measure(config, mode, base, batch, peak, device, frozen, lora, precision)
    gc.collect()  # the copy's model and precision hooks refer to each other: free them now
    probe_peak = peak.read()
    deeper = {}
    for s in depths:
        deeper[s] = _measure(config, mode, {**base, s: 2}, batch, None, device, frozen, lora,
                             precision)
        gc.collect()
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(config).parameters())
    return ModeProbe(mode, depths, measured_base, deeper, params=params,
                     state8_seconds_per_param=_state8_seconds(device), probe_peak=probe_peak)


def _measure(config: ModelConfig, mode: str, depths: dict[str, int], batch: int,
             peak: PeakRSS | None, device: str, frozen: Sequence[str] = (),
             lora: LoraConfig | None = None, precision: PrecisionConfig | None = None) -> Measured:
    plan, fp32_acts = _run_plan(config, mode, depths, batch, device, lora, precision, frozen)
    if peak is not None:
        peak.reset()
    model, bases = _build(config, depths, device, lora)
    batches = {b: to_device(model.example_batch(b), torch.device(device)) for b in {1, 2, batch}}
    mp = MixedPrecision(plan, update=UpdateSettings(), device=device, freeze=[*frozen, *bases])
    mp.setup(model)
    optimizer = make_optimizer(model, 1e-5, 0.0)
    mp.setup(model, optimizer)
    seconds = {}
    for b in sorted({batch, 1}, reverse=True):
        times: list[float] = []  # the first step allocates the optimizer's state: not timed
        while len(times) < (4 if not times or times[-1] < 2.0 else 2):  # a long step: once more
            start = time.perf_counter()
            train_step(model, [batches[b]], mp, optimizer)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds[b] = sorted(times[1:])[(len(times) - 1) // 2]
    acts = {}
    for ckpt in (False, True):
        if ckpt:
            checkpoint_modules(model, [b for b in BLOCKS if any(type(m).__name__ == b
                                                                for m in model.modules())])
        for b in (1, 2):
            with mp.accumulate(), ActivationMeter(model) as meter, mp.autocast():
                loss = model(batches[b])
            del loss
            acts[(ckpt, b)] = float(meter.total)
    return Measured(acts, seconds, plan.to_dict(), fp32_acts)


def _build(config: ModelConfig, depths: dict[str, int], device: str, lora: LoraConfig | None
           ) -> tuple[torch.nn.Module, list[str]]:
    """A shallow copy as the run builds it (the same weights every time), adapted by ``lora``;
    and the freeze patterns of its adapted layers' bases."""
    torch.manual_seed(0)
    model = build_model(config, depths).to(device)
    return model, adapt(model, lora)


def _run_plan(config: ModelConfig, mode: str, depths: dict[str, int], batch: int, device: str,
              lora: LoraConfig | None, precision: PrecisionConfig | None,
              frozen: Sequence[str] = ()) -> tuple[PrecisionPlan, dict[int, float]]:
    """The plan a run with ``precision`` trains ``mode`` with: measured as the trainer measures it
    (on a build of its own, ``frozen`` and the LoRA bases frozen, freed before the measured copy is
    built), or the mode's with the run's rules. With a measured plan, what the measurement's FP32
    passes save at micro-batch 1 and 2 (they run on the model itself, in FP32: its activations
    are FP32 where the run's are not), measured on that build; else nothing."""
    if precision is None or not precision.measure or mode == "fp32":
        return plan_for(mode, (precision.rules or None) if precision else None, device=device), {}
    model, bases = _build(config, depths, device, lora)
    plan = measured_plan(model, to_device(model.example_batch(batch), torch.device(device)), mode,
                         precision, freeze=[*frozen, *bases])
    fp32_acts = {}
    with state_kept(model, [*frozen, *bases]):
        for b in (1, 2):
            with ActivationMeter(model) as meter:
                loss = model(to_device(model.example_batch(b), torch.device(device)))
            del loss
            fp32_acts[b] = float(meter.total)
    del model
    gc.collect()
    return plan, fp32_acts


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _state8_seconds(device: str) -> float:
    """Seconds per parameter that 8-bit moments add to a step (dequantize and quantize two
    moments), measured on 2^20 elements."""
    from vlamp.precision.state8 import dequantize, quantize

    x = torch.randn(1 << 20, device=device)
    for _ in range(2):  # the first builds the code tables
        _sync(device)
        start = time.perf_counter()
        for signed in (True, False):
            codes, absmax = quantize(x.abs() if not signed else x, signed)
            dequantize(codes, absmax, signed, x)
        _sync(device)
    return (time.perf_counter() - start) / (1 << 20)
