"""A run's memory budget: ``vlamp fit`` and ``train.memory_budget``.

:func:`fit_run` predicts every candidate configuration of a run (:mod:`vlamp.train.fit`) and
chooses the fastest that fits; :func:`check_budget` is what the trainer calls before it builds
the model: with ``precision.mode=auto`` it trains with the choice, with a mode named it refuses a
run predicted not to fit, in one line with the numbers and the best configuration that would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from vlamp.models.registry import stack_depths
from vlamp.precision.autoplan import measured_here
from vlamp.precision.errors import VlampError
from vlamp.precision.memory import available_memory, parse_size
from vlamp.precision.plan import rules_file_mode
from vlamp.train import fit
from vlamp.train.config import RunConfig

CPU_MODES = ("fp32", "bf16-mixed", "bf16-true", "bf16-storage")
CUDA_MODES = (*CPU_MODES, "fp16-mixed")


@dataclasses.dataclass
class FitResult:
    """Every candidate's prediction, the budget and the choice (``None``: nothing fits)."""

    predictions: list[fit.Prediction]
    budget: int
    chosen: fit.Prediction | None
    asked: fit.Prediction | None  # the configuration as given, where it is one of the candidates
    notes: list[str]

    def reason(self) -> str:
        return fit.reason(self.chosen, self.predictions) if self.chosen else (
            f"nothing fits {fit.gib(self.budget)} GiB: the smallest peak is "
            f"{fit.gib(min(p.peak for p in self.predictions))} GiB "
            f"({min(self.predictions, key=lambda p: p.peak).candidate.label()})")


def budget_bytes(text: str, device: torch.device) -> int:
    """``auto`` (what this machine has free now) or a size."""
    return available_memory(device) if text == "auto" else parse_size(text)


def given(config: RunConfig) -> fit.Candidate:
    """The configuration ``config`` asks for, as a candidate (``auto`` mode: fp32)."""
    p, t = config.precision, config.train
    mode = "fp32" if p.mode == "auto" else p.mode
    update = fit.default_update(mode) if p.update == "auto" else p.update
    if not mode.endswith(("-true", "-storage")):
        update = "-"
    return fit.Candidate(mode, update, p.optimizer_state, bool(t.checkpoint), t.batch_size,
                         t.grad_accum, p.step_in_backward)


def candidate_modes(device: torch.device) -> tuple[list[str], list[str]]:
    """The modes worth predicting here: every mode whose compute format's measured GEMM
    throughput is at least half FP32's (``bf16-storage`` computes in FP32: always); and notes on
    those left out."""
    from vlamp.precision.hardware import measure_throughput

    gemm = measure_throughput(str(device), kinds=("gemm",))["gemm"]
    modes, notes = [], []
    for mode in CUDA_MODES if device.type == "cuda" else CPU_MODES:
        low = mode.split("-")[0]
        ratio = gemm.get(low, 0.0) / gemm["fp32"] if low != "fp32" else 1.0
        if mode.endswith("-storage") or ratio >= 0.5:
            modes.append(mode)
        else:
            notes.append(f"{mode} left out: {low} matrix math measured {ratio:.2f}x fp32's here "
                         f"(emulated); name it with --modes to predict it anyway")
    return modes, notes


def fit_run(config: RunConfig, device: torch.device, budget: int, modes: Sequence[str] | None = None,
            log: Callable[[str], None] | None = None, probes: dict | None = None,
            states: Sequence[str] = fit.STATES) -> FitResult:
    """Predicts the run's candidates (its batch split into micro-batches, every mode of ``modes``
    x update x optimizer state of ``states`` x checkpointing) and chooses the fastest that fits
    ``budget``. ``probes`` (mode -> probe) is filled and reused: a mode is measured once."""
    notes: list[str] = []
    pinned = rules_file_mode(config.precision.rules) if config.precision.rules else None
    if pinned is not None:  # its rules hold for that mode alone
        if modes is not None and pinned not in modes:
            raise VlampError(f"precision.rules {config.precision.rules!r} is for mode {pinned!r}: "
                             f"predict that mode (--modes {pinned}), or give rules without a mode")
        modes = [pinned]
        notes.append(f"only {pinned} predicted: the rules file {config.precision.rules!r} is for "
                     f"that mode")
    elif modes is None:
        modes, notes = candidate_modes(device)
    asked = given(config)
    frozen = list(config.train.freeze)
    batch = config.train.batch_size * config.train.grad_accum
    probes = {} if probes is None else probes
    named = [asked.mode] if config.precision.mode != "auto" else []  # the run as given, if one
    cands = fit.candidates(modes, batch, states=states, in_backward=not config.train.clip_grad_norm)
    if named and asked not in cands:
        cands.append(asked)
    held_by: dict[tuple[str, str, str], tuple] = {}  # (mode, update, state dtype) -> exact state
    for c in cands:
        key = (c.mode, c.update, c.optimizer_state)
        if key not in held_by:
            held_by[key] = fit.state_by_depth(config.model, *key, frozen=frozen,
                                              lora=config.train.lora, rules=config.precision.rules)
    measured = dict(probes)
    for m in dict.fromkeys([*modes, *named]):
        if m in probes:
            continue
        held = min(fit.held_bytes(held_by[k][0]) for k in held_by if k[0] == m)
        if held > budget:  # no need to measure what its weights and optimizer state rule out
            if log:
                log(f"fit: {m} not probed: its weights and optimizer state alone need "
                    f"{fit.gib(held)} GiB, over the budget of {fit.gib(budget)} GiB")
            measured[m] = fit.unmeasured(config.model, m)
        else:
            probes[m] = measured[m] = fit.probe(config.model, m, batch, log, device, frozen,
                                                config.train.lora, config.precision)
    predictions = []
    sample = fit.sample_bytes(config.model)
    depths = stack_depths(config.model)  # the probes' shallow copies serve any depth
    scaled = {m: dataclasses.replace(p, depths={**p.depths, **depths}) for m, p in measured.items()}
    measures = {m: config.precision.measure and measured_here(m, device) for m in scaled}
    for c in cands:
        key = (c.mode, c.update, c.optimizer_state)
        predictions.append(fit.predict(c, *held_by[key], scaled[c.mode], sample,
                                       built_here=device.type == "cpu", measured=measures[c.mode]))
    chosen = fit.choose(predictions, budget)
    mine = next((p for p in predictions if p.candidate == asked), None)
    return FitResult(predictions, budget, chosen, mine, notes)


def largest(config: RunConfig, key: str, device: torch.device, budget: int,
            modes: Sequence[str] | None = None, log: Callable[[str], None] | None = None,
            limit: int = 4096, states: Sequence[str] = fit.STATES) -> tuple[int, FitResult] | None:
    """The largest value of the integer model key ``key`` (a depth: ``depth``, ``text_layers``)
    at which some candidate fits ``budget``, by bisection; the probes are made once (shallow
    copies do not depend on depth). ``None`` if not even 1 fits.

    Raises:
        VlampError: If ``key`` is not a depth of this model's stacks.
    """
    from vlamp.models.registry import stack_depths as depths_of

    field = key.removeprefix("model.")
    base = depths_of(config.model)
    if field not in ("depth", "text_layers") or not base:
        raise VlampError(f"--largest {key}: the key must be a layer count of the model, "
                         f"model.depth or model.text_layers (for a model sized by them)")
    probes: dict = {}
    tried: dict[int, FitResult] = {}

    def at(n: int) -> FitResult:
        if n not in tried:
            model = dataclasses.replace(config.model, **{field: n})
            tried[n] = fit_run(dataclasses.replace(config, model=model), device, budget, modes,
                               log, probes, states)
        return tried[n]

    if at(1).chosen is None:
        return None
    lo, hi = 1, 2
    while hi <= limit and at(hi).chosen is not None:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid).chosen is not None else (lo, mid)
    return lo, at(lo)


def with_candidate(config: RunConfig, c: fit.Candidate) -> RunConfig:
    """``config`` set to train with candidate ``c``."""
    precision = dataclasses.replace(config.precision, mode=c.mode, optimizer_state=c.optimizer_state,
                                    update=c.update if c.update != "-" else "auto",
                                    step_in_backward=c.in_backward)
    blocks = fit.blocks_of(config.model) if c.checkpoint else list(config.train.checkpoint)
    train = dataclasses.replace(config.train, batch_size=c.micro_batch, grad_accum=c.grad_accum,
                                checkpoint=blocks if c.checkpoint else [])
    return dataclasses.replace(config, precision=precision, train=train)


def cap_device_memory(budget: int, device: torch.device, log: Callable[[str], None] | None = None
                      ) -> None:
    """On CUDA, a budget below the card's memory caps this process's allocator at it (what it
    holds now plus the budget), so a 24 GB card can be stood in for on a larger one: a run that
    outgrows the budget fails with CUDA's out-of-memory error instead of quietly using more."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    held = torch.cuda.memory_allocated(device)
    if budget + held < total:
        torch.cuda.set_per_process_memory_fraction((budget + held) / total, device)
        if log:
            log(f"memory budget: this process may allocate {fit.gib(budget)} GiB of the "
                f"{fit.gib(total)} GiB on {torch.cuda.get_device_name(device)}")


def check_budget(config: RunConfig, device: torch.device, log: Callable[[str], None] | None = None
                 ) -> tuple[RunConfig, fit.Prediction | None]:
    """What the trainer does with ``train.memory_budget`` before it builds the model.

    Returns:
        The config to train with (the fit's choice with ``precision.mode=auto``; else as given)
        and its prediction; ``(config, None)`` without a budget. A prediction that does not fit
        is one that fits only with its plan from the cache (``if_cached``): the trainer looks
        there once the model is built, and refuses with :func:`uncached_refusal` on a miss.

    Raises:
        VlampError: If the run is predicted not to fit: one line with the prediction, the budget
            and the best configuration that fits (or that none does).
    """
    text = config.train.memory_budget
    if not text:
        return config, None
    budget = budget_bytes(text, device)
    cap_device_memory(budget, device, log)
    auto = config.precision.mode == "auto"
    probes: dict = {}
    result = fit_run(config, device, budget, None if auto else [config.precision.mode], log, probes)
    if auto and result.chosen is not None:
        if log:
            log(f"memory budget {fit.gib(budget)} GiB: {result.reason()}")
        return with_candidate(config, result.chosen.candidate), result.chosen
    mine = result.asked
    if mine is not None and mine.fits:
        return config, mine
    if mine is not None and mine.fits_if_cached(budget):  # the trainer looks in the cache, built
        mine.if_cached.fits = True
        if log:
            log(f"memory budget {fit.gib(budget)} GiB: this run fits if its measured plan is in the "
                f"cache ({fit.gib(mine.if_cached.peak)} GiB); measuring it would need "
                f"{fit.gib(mine.peak)}")
        return config, mine
    if not auto:  # what would fit, over every mode
        result = fit_run(config, device, budget, log=log, probes=probes)
    best = result.chosen
    need = f"needs {fit.gib(mine.peak)} GiB" if mine is not None else "is not one fit can predict"
    if mine is not None and mine.moment == "measure":
        need += (" at its plan's measurement (precision.measure=false trains the mode's plan as is "
                 "and skips it)")
    fix = (f"; the fastest that fits: {' '.join(best.candidate.overrides(fit.blocks_of(config.model)))}"
           f" ({fit.gib(best.peak)} GiB)" if best is not None else f"; {result.reason()}")
    raise VlampError(f"train.memory_budget: this run {need} (predicted), over the budget of "
                     f"{fit.gib(budget)} GiB{fix}")


def uncached_refusal(config: RunConfig, device: torch.device, predicted: fit.Prediction) -> str:
    """The refusal of a run that fits its budget only with its plan from the cache, when the
    plan is not there (see :func:`check_budget`)."""
    budget = budget_bytes(config.train.memory_budget, device)
    return (f"train.memory_budget: this run needs {fit.gib(predicted.peak)} GiB at its plan's "
            f"measurement (predicted), over the budget of {fit.gib(budget)} GiB, and no measured "
            f"plan is cached for this model, batch and machine (a run of this config caches it): "
            f"give a budget that holds the measurement, or set precision.measure=false (the "
            f"mode's plan as is, {fit.gib(predicted.if_cached.peak)} GiB)")
