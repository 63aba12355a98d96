"""The measured plan: time every low-precision module of a real model on a real batch, in low precision
and in FP32, and keep FP32 where low precision is slower on this machine.

Algorithm (``measure_plan``)::

    base  = the mode's plan (user rules, then the built-in FP32 islands), with its lean islands:
            those that may hand on the low-precision dtype (vlamp.precision.lean), measured
    probe = a copy of the model set up as the run will be (``base`` applied, the modules the run
            freezes frozen and stored as it stores them); one forward under autocast records the
            inputs of every candidate: a leaf module that ``base`` runs in low precision by default
    for each candidate, on copies of it, interleaved, ``repeats`` times after a warm-up:
        t_low  = forward (under the mode's autocast) + backward
        t_fp32 = the same behind the boundary an FP32 rule puts there (inputs cast up,
                 autocast off)
        keep FP32  iff  t_low > t_fp32 * (1 + margin)
    measured = base + one rule per kept module, ``name -> fp32`` (FP32 out, too: its consumer is
               either an autocast op, which casts once anyway, or an element-wise op with FP32
               partners, where a low-precision output would be cast straight back up); in a mode
               that stores weights in low precision (``bf16-true``), ``name -> params=bf16,
               compute=fp32,output=bf16``: a compute island only, its weights stored (and saved
               for the backward) as before and its output handed on in the storage dtype, so the
               memory the mode is for is kept (attention, with no weights, costs nothing stored)
    step: forward+backward of the whole model in FP32 against ``measured``, interleaved;
          ``auto`` takes the low-precision mode only when its step is faster (never a slower mode)

Memory: the FP32 passes (lean islands' reference gradients, the FP32 step) run on the model
itself, its buffers and ``.grad`` put back after; every other pass on one planned copy at a time,
made straight in its planned dtypes (:func:`~vlamp.precision.probe.planned_copy`). At most the
model, one copy, the trained parameters' FP32 gradients and the copy's are held, with one forward's
activations (:mod:`vlamp.train.fit` counts this moment); the capture above also keeps a copy of
every candidate's input, which that count leaves out.

The result is an ordinary :class:`PrecisionPlan` (YAML-able rules) whose ``measured`` field keeps the
times and the reason. It is cached per (hardware, torch version, threads, model signature, batch
shapes, mode, rules, frozen modules) under ``$XDG_CACHE_HOME/vlamp/plans``; any change of those is a new key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlamp.precision.apply import _MARK, apply_plan
from vlamp.precision.dtypes import dtype_name
from vlamp.precision.errors import VlampError
from vlamp.precision.freeze import frozen_modules
from vlamp.precision.hardware import choose_mode, detect, native_formats, synchronize
from vlamp.precision.lean import DEFAULT_TOLERANCE, LEAN, lean_plan, measure_lean
from vlamp.precision.modes import Mode, get_mode
from vlamp.precision.plan import PrecisionPlan, Resolved, Rule, RuleSpec
from vlamp.precision.policy import FP32, Policy
from vlamp.precision.probe import (
    LossFn,
    capture_inputs,
    loss_of,
    model_device,
    planned_copy,
    rng_kept,
    state_kept,
    tensors_in,
)
from vlamp.precision.sensitivity import sensitivity_plan

CACHE_VERSION = 3  # 2: measured FP32 modules hand on FP32; 3: lean islands


def default_plan_cache() -> Path:
    """``$XDG_CACHE_HOME/vlamp/plans`` (``~/.cache/vlamp/plans``)."""
    # (vlamp.io.cache_dir says the same; precision imports nothing else from vlamp)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlamp" / "plans"


def measure_plan(
    model: nn.Module,
    example_batch: Any,
    mode: str | Mode = "auto",
    *,
    rules: Sequence[RuleSpec] | Mapping[str, str] | str | os.PathLike[str] | None = None,
    builtin_rules: bool = True,
    loss_fn: LossFn | None = None,
    repeats: int = 7,
    margin: float = 0.05,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    require_native: bool = True,
    log: Callable[[str], None] | None = None,
    sensitivity: float | None = None,
    lean: float | None = DEFAULT_TOLERANCE,
    freeze: Sequence[str] = (),
    cached_only: bool = False,
) -> PrecisionPlan | None:
    """Measures which modules of ``model`` are faster in FP32 than in low precision, here, and,
    with ``sensitivity``, which lose too much accuracy in low precision. ``model`` is not changed:
    its FP32 passes run on it (buffers and ``.grad`` put back), every other on one copy at a time.

    Args:
        model: The model, not yet set up by a plan, on the device it will train on.
        example_batch: A real training batch; ``loss_fn(model, batch)`` returns its loss.
        mode: ``"auto"`` (the hardware proposes a low-precision mode, the measured step decides
            whether it is taken) or a mode name (kept; only its per-module plan is measured; in a
            ``-true`` mode, FP32 compute only: see :func:`island_policy`). Emulated formats and
            ``bf16-storage`` are not measured: their plan is returned as is, the reason recorded.
        rules: User rules or a YAML rules file: first, never overridden by a measurement.
        builtin_rules: Whether the built-in FP32 islands apply.
        loss_fn: How to get the loss from the model and the batch (default ``model(batch)``).
        repeats: Timed repetitions per module and per variant (medians are compared).
        margin: Keep FP32 only where low precision is slower by more than this fraction.
        cache, cache_dir, refresh: Read and write the plan cache in ``cache_dir`` (default
            :func:`default_plan_cache`); ``refresh`` measures again and overwrites it.
        require_native: With a named mode, measure only where this hardware computes its format
            natively; ``False`` measures an emulated format too (to see per module what it costs).
        log: Called with one line for what is done (cache hit, measuring, the decision).
        sensitivity: The accuracy half, first: keep in FP32 the modules whose own error in low
            precision passes this (:mod:`vlamp.precision.sensitivity`), *not* the built-in islands.
        lean: Lean islands (:mod:`vlamp.precision.lean`), next: the growth of the gradient error
            their measurement allows (default 25%); ``None``: every island hands on FP32. Both
            halves apply to the ``-true`` modes and emulated formats too.
        freeze: The modules the run freezes (``MixedPrecision(freeze=...)``): every pass freezes
            and stores them as the run will (no weight gradients; ``-mixed``: the compute dtype).
        cached_only: Measure nothing: ``None`` where the plan is not in the cache to be read.

    Returns:
        A :class:`PrecisionPlan` for the chosen mode; ``plan.measured`` holds per-module times
        (``modules``), step times (``step_ms``), the ``reason``, the cache ``key``, ``from_cache``.

    Raises:
        VlampError: If the model was already set up, ``repeats < 1``, ``margin < 0``, ``lean < 0``,
            or a ``freeze`` pattern matches no module.
    """
    say = log or (lambda _msg: None)
    _check_arguments(model, repeats, margin, sensitivity, lean, freeze)
    hw = detect(model_device(model))
    requested = mode if isinstance(mode, str) else mode.name
    is_auto = requested.strip().lower() == "auto"
    if isinstance(rules, (str, os.PathLike)):  # a YAML rules file
        rules, builtin_rules = _load_rules(rules, None if is_auto else requested)
    low_mode = _proposed(hw, rules, builtin_rules, say) if is_auto else get_mode(requested)
    if isinstance(low_mode, PrecisionPlan) or low_mode.name == "fp32":  # nothing to measure
        return low_mode if is_auto else PrecisionPlan("fp32", rules, builtin_rules=builtin_rules)
    if not is_auto:
        reason = _unmeasured_reason(low_mode, hw, require_native)
        if reason is not None:  # the accuracy halves still apply
            plan = _accurate_base(model, example_batch, low_mode, rules, builtin_rules,
                                  sensitivity, lean, loss_fn, say, freeze)
            plan.measured = {"requested": requested, "reason": reason, **(plan.measured or {})}
            say(f"precision: {low_mode.name} not measured ({reason})")
            return plan
    return _timed_plan(model, example_batch, low_mode, requested, rules, builtin_rules, hw,
                       loss_fn=loss_fn, repeats=repeats, margin=margin, cache=cache,
                       cache_dir=cache_dir, refresh=refresh, sensitivity=sensitivity, lean=lean,
                       say=say, freeze=freeze, cached_only=cached_only)


def _proposed(hw: Any, rules: Any, builtin_rules: bool, say: Callable[[str], None]
              ) -> Mode | PrecisionPlan:
    """``auto``: the low-precision mode the hardware proposes, or the fp32 plan if it proposes none."""
    choice = choose_mode(hw)
    if choice.mode != "fp32":
        return get_mode(choice.mode)
    say(f"precision: fp32 ({choice.reason}); nothing to measure")
    return PrecisionPlan("fp32", rules, builtin_rules=builtin_rules,
                         measured={"requested": "auto", "reason": choice.reason})


def _load_rules(path: str | os.PathLike[str], mode: str | None) -> tuple[tuple[Rule, ...], bool]:
    loaded = PrecisionPlan.load(path, mode=mode)
    return loaded.user_rules, loaded.builtin_rules


def _check_arguments(model: nn.Module, repeats: int, margin: float, sensitivity: float | None,
                     lean: float | None, freeze: Sequence[str]) -> None:
    if repeats < 1 or margin < 0:
        raise VlampError(f"measure_plan: repeats must be >= 1 and margin >= 0, got {repeats}, {margin}")
    if any(hasattr(m, _MARK) for m in model.modules()):
        raise VlampError("measure_plan: the model already has a precision plan applied; "
                         "measure before MixedPrecision.setup")
    if sensitivity is not None and sensitivity <= 0:
        raise VlampError(f"measure_plan: sensitivity must be a relative error > 0, got {sensitivity}")
    if lean is not None and not lean >= 0:
        raise VlampError(f"measure_plan: lean must be a fraction >= 0 (or None: off), got {lean}")
    frozen_modules(model, freeze)  # a pattern that matches nothing fails here, before any pass


def _timed_plan(model: nn.Module, example_batch: Any, low_mode: Mode, requested: str, rules: Any,
                builtin_rules: bool, hw: Any, *, loss_fn: LossFn | None, repeats: int,
                margin: float, cache: bool, cache_dir: str | os.PathLike[str] | None,
                refresh: bool, sensitivity: float | None, lean: float | None,
                say: Callable[[str], None], freeze: Sequence[str], cached_only: bool = False
                ) -> PrecisionPlan | None:
    """The timed half of :func:`measure_plan`: from the cache, or measured and cached (``None``
    instead with ``cached_only``)."""
    is_auto = requested.strip().lower() == "auto"
    device = model_device(model)
    base = PrecisionPlan(low_mode, rules, builtin_rules=builtin_rules)
    asked = requested + ("" if sensitivity is None else f"|sensitivity={sensitivity:g}") + (
        "" if lean is None else f"|lean={lean:g}") + (
        f"|freeze={','.join(freeze)}" if freeze else "")
    key = _cache_key(model, example_batch, asked, base, hw.as_dict(), margin, loss_fn)
    path = Path(cache_dir) if cache_dir is not None else default_plan_cache()
    path = path / f"{key[:24]}.yaml"
    if cache and not refresh:
        cached = _read_cached(path, key)
        if cached is not None:
            say(f"precision: {cached.mode.name}, measured plan from the cache ({path})")
            return cached
    if cached_only:
        return None
    base = _accurate_base(model, example_batch, low_mode, rules, builtin_rules, sensitivity, lean,
                          loss_fn, say, freeze)  # the speed half times the plan with its lean islands
    say(f"precision: measuring {low_mode.name} against fp32 per module on {hw.name} "
        f"({torch.get_num_threads()} threads)...")
    chosen, reason, step, modules = _measure(model, example_batch, base, is_auto, loss_fn, repeats,
                                             margin, device, freeze)
    low = low_mode.compute_dtype
    chosen.measured = {
        "requested": requested, "reason": reason, "key": key, "dtype": dtype_name(low),
        "hardware": hw.name, "torch": str(torch.__version__), "threads": torch.get_num_threads(),
        "margin": margin, "step_ms": step, "modules": modules, "from_cache": False,
        **({"lean": base.measured["lean"]}  # (an fp32 choice has no islands to lean)
           if base.measured and "lean" in base.measured and chosen.mode.name != "fp32" else {}),
    }
    say(f"precision: {chosen.mode.name} ({reason})")
    if cache:
        _write_cached(path, chosen)
    return chosen


def _unmeasured_reason(mode: Mode, hw: Any, require_native: bool) -> str | None:
    """Why a named low-precision mode's plan is not timed here (``None``: it is)."""
    fmt = dtype_name(mode.compute_dtype)
    if mode.default_policy.compute == torch.float32:  # bf16-storage: named by the storage
        stored = dtype_name(mode.default_policy.param)
        return (f"{mode.name} stores weights in {stored} and computes every module in FP32: "
                f"there is no low-precision module to time")
    if require_native and fmt not in native_formats(hw):
        return (f"{hw.name} has no native {fmt}: it is emulated everywhere, so a measured plan "
                f"would only move the whole model to FP32; the mode's plan is used as is")
    return None


def measured_here(mode: str | Mode, device: torch.device | str = "cpu") -> bool:
    """Whether :func:`measure_plan` times ``mode``'s plan on ``device`` (and so holds a planned
    copy of the model beside it): not fp32, not ``bf16-storage``, a format native there."""
    m = get_mode(mode, device)
    return m.name != "fp32" and _unmeasured_reason(m, detect(torch.device(device)), True) is None


def island_policy(mode: Mode) -> Policy:
    """What a module the measurement keeps in FP32 gets: ``fp32`` in a mode with FP32 weights; in
    one that stores them in low precision, FP32 compute over the stored weights (cast up for the
    forward, as ``bf16-storage`` does) with the output in the storage dtype: no byte more stored."""
    stored = mode.default_policy.param
    return FP32 if stored == torch.float32 else Policy(stored, torch.float32, stored)


def _measure(model: nn.Module, batch: Any, base: PrecisionPlan, is_auto: bool,
             loss_fn: LossFn | None, repeats: int, margin: float, device: torch.device,
             freeze: Sequence[str] = ()
             ) -> tuple[PrecisionPlan, str, dict[str, float], dict[str, dict[str, Any]]]:
    """Times every candidate module and the whole step (see the module's text): the chosen plan,
    the reason, the step times and the per-module times."""
    low_mode, builtin_rules = base.mode, base.builtin_rules
    with rng_kept():
        modules = _time_modules(model, batch, base, loss_fn, repeats, device, freeze)
        keep = [n for n, t in modules.items() if t["low_ms"] > t["fp32_ms"] * (1 + margin)]
        for name in keep:
            modules[name]["kept_fp32"] = True
        low = low_mode.compute_dtype
        measured_rules = [Rule(name, island_policy(low_mode),
                               f"measured:{dtype_name(low)} {modules[name]['low_ms']:.2f} ms > "
                               f"fp32 {modules[name]['fp32_ms']:.2f} ms") for name in keep]
        low_plan = PrecisionPlan(low_mode, (*base.user_rules, *measured_rules),
                                 builtin_rules=builtin_rules)
        step = _time_steps(model, batch, low_plan, loss_fn, repeats, device, freeze)
    fp32_ms, low_ms = step["fp32"], step[low_mode.name]
    faster = low_ms < fp32_ms
    if is_auto and not faster:  # (a lean island's rule would cast an FP32 model's outputs down)
        chosen = PrecisionPlan("fp32", [r for r in base.user_rules if LEAN not in r.label],
                               builtin_rules=builtin_rules)
        reason = (f"measured: a {low_mode.name} step takes {low_ms:.1f} ms against {fp32_ms:.1f} ms "
                  f"in fp32 here, so fp32 is faster")
    else:
        chosen = low_plan
        reason = (f"measured: a {low_mode.name} step takes {low_ms:.1f} ms against {fp32_ms:.1f} ms "
                  f"in fp32 ({fp32_ms / low_ms:.2f}x); {len(keep)} of {len(modules)} modules kept in "
                  f"fp32 where {dtype_name(low)} was slower")
        if not faster:
            reason += f"; {low_mode.name} is slower than fp32 on this machine"
    return chosen, reason, step, modules


def _accurate_base(model: nn.Module, batch: Any, mode: Mode, rules: Any, builtin_rules: bool,
                   sensitivity: float | None, lean: float | None, loss_fn: LossFn | None,
                   say: Callable[[str], None], freeze: Sequence[str]) -> PrecisionPlan:
    """The plan the speed half starts from: the user's rules, with ``sensitivity`` the FP32 rules
    of the modules above it (instead of the built-in islands), with ``lean`` the lean islands."""
    if sensitivity is not None:
        rules, builtin_rules = _accurate_rules(model, batch, mode, rules, sensitivity, loss_fn, say)
    plan = PrecisionPlan(mode, rules, builtin_rules=builtin_rules)
    return _lean(model, batch, plan, lean, loss_fn, say, freeze) if lean is not None else plan


def _lean(model: nn.Module, batch: Any, plan: PrecisionPlan, tolerance: float,
          loss_fn: LossFn | None, say: Callable[[str], None], freeze: Sequence[str]) -> PrecisionPlan:
    """``plan`` with its lean islands (:mod:`vlamp.precision.lean`) and their record."""
    rules, record = measure_lean(model, batch, plan, tolerance=tolerance, loss_fn=loss_fn, log=say,
                                 freeze=freeze)
    if not record["islands"]:
        return plan
    say(f"precision: {len(rules)} of {len(record['islands'])} FP32 islands hand on "
        f"{record['dtype']} (gradient error against fp32 {record['mode_error']:.2e} -> "
        f"{record['lean_error']:.2e})")
    return lean_plan(plan, rules, record)


def _accurate_rules(model: nn.Module, batch: Any, mode: Mode, rules: Any, threshold: float,
                    loss_fn: LossFn | None, say: Callable[[str], None]) -> tuple[list[Rule], bool]:
    """The user's rules followed by FP32 rules for the modules whose low-precision error passes
    ``threshold``; the built-in islands are then off (the measurement replaces them)."""
    say(f"precision: measuring each module's {dtype_name(mode.compute_dtype)} error against fp32...")
    accurate, table = sensitivity_plan(model, batch, mode, threshold=threshold, loss_fn=loss_fn)
    kept = [r.pattern for r in accurate.user_rules]
    say(f"precision: {len(kept)} of {len(table)} modules above {threshold:g} relative error, kept "
        f"in fp32{': ' + ', '.join(kept[:6]) if kept else ''}{' ...' if len(kept) > 6 else ''}")
    return [*PrecisionPlan(mode, rules).user_rules, *accurate.user_rules], False


# -- timing ---------------------------------------------------------------------------------------
def _backward(output: Any) -> None:
    outs = [t for t in tensors_in(output) if t.requires_grad and t.is_floating_point()]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])


def _median_times(fns: Mapping[str, Callable[[], None]], cleanup: Callable[[], None], repeats: int,
                  device: torch.device) -> dict[str, float]:
    """Median milliseconds of each function, run interleaved after one warm-up each."""
    for fn in fns.values():
        fn()
        cleanup()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            samples[k].append((time.perf_counter() - t0) * 1e3)
            cleanup()
    return {k: statistics.median(v) for k, v in samples.items()}


def _candidates(resolved: Sequence[Resolved], low: torch.dtype) -> list[Resolved]:
    return [r for r in resolved if r.name and r.policy.compute == low
            and r.decided_by in ("inherited", "mode default") and next(r.module.children(), None) is None]


def _time_modules(model: nn.Module, batch: Any, base: PrecisionPlan, loss_fn: LossFn | None,
                  repeats: int, device: torch.device, freeze: Sequence[str] = ()
                  ) -> dict[str, dict[str, Any]]:
    mode, low = base.mode, base.mode.compute_dtype
    probe, resolved = planned_copy(model, base, freeze)
    candidates = _candidates(resolved, low)
    with mode.autocast(device.type):
        inputs = capture_inputs(probe, batch, {r.name: r.module for r in candidates}, loss_fn)
    out: dict[str, dict[str, Any]] = {}
    for r in candidates:
        if r.name not in inputs:
            continue  # never called in a forward pass: nothing to time
        args, kwargs = inputs[r.name]
        as_low, as_fp32 = copy.deepcopy(r.module), copy.deepcopy(r.module)
        delattr(as_fp32, _MARK)
        apply_plan([Resolved("", as_fp32, island_policy(mode), "measure", r.policy)])

        def run(m: nn.Module, a: tuple = args, kw: dict = kwargs) -> Callable[[], None]:
            def fn() -> None:
                with mode.autocast(device.type):
                    output = m(*a, **kw)
                _backward(output)
            return fn

        def cleanup(a: tuple = args, kw: dict = kwargs, copies: tuple = (as_low, as_fp32)) -> None:
            for m in copies:
                m.zero_grad(set_to_none=True)
            for t in tensors_in((a, kw)):
                t.grad = None

        times = _median_times({"low": run(as_low), "fp32": run(as_fp32)}, cleanup, repeats, device)
        out[r.name] = {"class": type(r.module).__name__, "dtype": dtype_name(low),
                       "low_ms": round(times["low"], 4), "fp32_ms": round(times["fp32"], 4),
                       "kept_fp32": False}
    return out


def _time_steps(model: nn.Module, batch: Any, low_plan: PrecisionPlan, loss_fn: LossFn | None,
                repeats: int, device: torch.device, freeze: Sequence[str] = ()
                ) -> dict[str, float]:
    """Forward+backward of the whole model in FP32 and under ``low_plan``, interleaved (ms). FP32
    runs on ``model`` itself (put back after), ``low_plan`` on a copy: two sets of weights at once,
    not three."""
    mixed, _ = planned_copy(model, low_plan, freeze)
    mode = low_plan.mode

    def fp32_step() -> None:
        loss_of(model, batch, loss_fn).backward()

    def low_step() -> None:
        with mode.autocast(device.type):
            loss = loss_of(mixed, batch, loss_fn)
        loss.backward()

    def cleanup() -> None:
        model.zero_grad(set_to_none=True)
        mixed.zero_grad(set_to_none=True)

    with state_kept(model, freeze):
        times = _median_times({"fp32": fp32_step, mode.name: low_step}, cleanup, repeats, device)
    return {k: round(v, 3) for k, v in times.items()}


# -- cache ----------------------------------------------------------------------------------------
def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype), list(value.stride()), value.device.type]
    if isinstance(value, Mapping):
        return {str(k): _signature(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (tuple, list)):
        return [_signature(v) for v in value]
    return type(value).__name__


def _cache_key(model: nn.Module, batch: Any, requested: str, base: PrecisionPlan,
               hardware: dict[str, Any], margin: float, loss_fn: LossFn | None) -> str:
    modules = [[name, type(m).__qualname__,
                [[n, list(p.shape), str(p.dtype), list(p.stride())] for n, p in m.named_parameters(recurse=False)]]
               for name, m in model.named_modules()]
    spec = {
        "version": CACHE_VERSION, "hardware": hardware, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": modules, "batch": _signature(batch),
        "mode": requested, "rules": [[r.pattern, str(r.policy)] for r in base.user_rules],
        "builtin_rules": base.builtin_rules, "margin": margin,
        "loss_fn": getattr(loss_fn, "__qualname__", None),
        "tf32": getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
        if hardware.get("device") == "cuda" else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _read_cached(path: Path, key: str) -> PrecisionPlan | None:
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
        plan = PrecisionPlan.from_dict(data, where=f"cached plan {str(path)!r}")
        if not plan.measured or plan.measured.get("key") != key:
            raise VlampError("it was measured for another key")
    except (OSError, yaml.YAMLError, VlampError) as e:
        warnings.warn(f"ignoring the cached plan {path}: {str(e).splitlines()[0]}; measuring again",
                      UserWarning, stacklevel=3)
        return None
    plan.measured["from_cache"] = True
    plan.measured["cache_path"] = str(path)
    return plan


def _write_cached(path: Path, plan: PrecisionPlan) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
    except OSError as e:
        warnings.warn(f"could not cache the measured plan at {path}: {e.strerror}", UserWarning,
                      stacklevel=3)


__all__ = ["default_plan_cache", "measure_plan", "measured_here"]

