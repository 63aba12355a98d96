"""What fits: a training run's peak memory predicted by kind for candidate configurations, the
fastest one that fits a budget chosen, and a run that would not fit refused before its first step.

Where each figure comes from:

* **State** (weights, FP32 masters, Kahan buffers, gradients, optimizer state): exact, from the
  plan's dtype for every parameter of the full model, built on the meta device (nothing
  allocated), and :func:`vlamp.precision.describe.state_by_kind`.
* **Activations** and **step time**: measured (:mod:`vlamp.train.fit_probe`) on shallow copies of
  the model (one layer per stack, then one more in each stack), at micro-batches of 1 and 2, and
  extrapolated linearly in depth and batch; with checkpointing of every block, plus one block's
  activations for its recomputation in the backward.
* **Transient**: what a step holds beside the state for a moment: the bucketed update's FP32
  copies of the largest bucket, and in ``bf16-storage`` the FP32 copy of the largest module's
  weights and its FP32 gradient.
* **Runtime**: what the allocator and runtime hold beyond the tensors, measured on the probe
  (its measured peak minus its predicted tensors).

The peak is the largest of four moments: the end of the forward (activations, no gradients
unless micro-batches accumulate them), the optimizer step (all gradients, no activations), on a
CPU the build (every weight in FP32 before the plan stores it in its dtype), and, where the run
measures its plan (``precision.measure``, a mode measured on this hardware), the measurement
(:mod:`vlamp.precision.autoplan`): the model still in FP32, one planned copy (stored as the run
stores it), the trained parameters' FP32 gradients and the copy's, and one forward's activations
at the run's micro-batch (its FP32 passes', measured by the probe; and that batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from vlamp.models.config import ModelConfig
from vlamp.models.lora import adapt
from vlamp.models.registry import BLOCKS, build_model, stack_depths
from vlamp.precision.describe import state_by_kind
from vlamp.precision.modes import get_mode
from vlamp.precision.plan import plan_for
from vlamp.precision.weight_update import BUCKET, mode_label
from vlamp.train.config import LoraConfig, PrecisionConfig
from vlamp.train.fit_probe import Measured, ModeProbe, probe_mode

KINDS = ("weights", "masters", "compensation", "grads", "optimizer", "activations", "transient",
         "data", "runtime")
STATES = ("auto", "8bit")  # optimizer-state dtypes: the update method's own, and 8-bit moments
UPDATES_OF = {"true": ("master", "kahan", "stochastic"), "storage": ("stochastic", "kahan")}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration a run could train with.

    Attributes:
        mode: The precision mode.
        update: How low-precision weights are updated (``master``, ``kahan``, ``stochastic``;
            ``-`` where no weight is stored low).
        optimizer_state: ``auto`` or ``8bit``.
        checkpoint: Every block recomputes its forward in the backward.
        micro_batch: Samples per micro-batch.
        grad_accum: Micro-batches per step (``micro_batch * grad_accum`` is the batch).
        in_backward: Each weight stepped inside the backward (``precision.step_in_backward``).
    """

    mode: str
    update: str = "-"
    optimizer_state: str = "auto"
    checkpoint: bool = False
    micro_batch: int = 1
    grad_accum: int = 1
    in_backward: bool = False

    def label(self) -> str:
        """``bf16-storage/stochastic+8bit ckpt 4x2`` (micro-batch x accumulation): the mode as
        ``vlamp bench --modes`` spells it (:func:`~vlamp.precision.weight_update.mode_label`),
        then how the step is run."""
        text = mode_label(self.mode, "auto" if self.update == "-" else self.update, self.optimizer_state)
        text += " in-bwd" if self.in_backward else ""
        return f"{text}{' ckpt' if self.checkpoint else ''} {self.micro_batch}x{self.grad_accum}"

    def overrides(self, blocks: Sequence[str]) -> list[str]:
        """The ``vlamp train`` overrides that run this configuration."""
        out = [f"precision.mode={self.mode}", f"precision.optimizer_state={self.optimizer_state}",
               f"train.batch_size={self.micro_batch}", f"train.grad_accum={self.grad_accum}"]
        if self.update != "-":
            out.append(f"precision.update={self.update}")
        if self.checkpoint:
            out.append(f"train.checkpoint=[{','.join(blocks)}]")
        if self.in_backward:
            out.append("precision.step_in_backward=true")
        return out


@dataclasses.dataclass
class Prediction:
    """A candidate's predicted peak by kind (bytes), its expected step time (seconds, from the
    probes) and whether it fits the budget."""

    candidate: Candidate
    by_kind: dict[str, int]
    step_s: float
    fits: bool = True
    moment: str = "step"  # when the peak is reached: forward, step, build or measure
    # a run that would measure its plan: the prediction when the plan is read from the cache instead
    if_cached: Prediction | None = None

    @property
    def peak(self) -> int:
        return sum(self.by_kind.values())

    def fits_if_cached(self, budget: int) -> bool:
        """Over ``budget`` only at its plan's measurement: it fits with the plan read from the cache."""
        return self.peak > budget and self.if_cached is not None and self.if_cached.peak <= budget


def candidates(modes: Sequence[str], batch: int, *, updates: Sequence[str] | None = None,
               states: Sequence[str] = STATES, checkpoint: Sequence[bool] = (False, True),
               min_micro: int = 1, in_backward: bool = False) -> list[Candidate]:
    """Every combination of mode x update x optimizer state x checkpointing x micro-batch (the
    batch's divisors down to ``min_micro``, accumulating to the same batch); with
    ``in_backward`` (a run without clipping) also the step in the backward, where it can be:
    one micro-batch, no masters, no loss scaler."""
    out = []
    micros = [m for m in range(batch, 0, -1) if batch % m == 0 and m >= min_micro
              and (m == batch or (batch // m) & (batch // m - 1) == 0)]  # batch / power of two
    for mode in modes:
        kind = mode.rsplit("-", 1)[-1]
        methods = updates or UPDATES_OF.get(kind, ("-",))
        for update in (methods if kind in UPDATES_OF else ("-",)):
            for state in states:
                for ckpt in checkpoint:
                    for m in micros:
                        out.append(Candidate(mode, update, state, ckpt, m, batch // m))
                    if in_backward and update != "master" and not mode.startswith("fp16"):
                        out.append(Candidate(mode, update, state, ckpt, batch, 1, True))
    return out


def state_bytes(config: ModelConfig, mode: str, update: str, optimizer_state: str,
                frozen: Sequence[str] = (), depths: dict[str, int] | None = None,
                lora: LoraConfig | None = None, rules: str | None = None
                ) -> tuple[dict[str, float], dict[str, int]]:
    """The exact state of the full model by kind (weights, masters, compensation, grads,
    optimizer), from the plan's dtypes on a meta-device build; and sizes the transient needs
    (``largest_param``, ``largest_module``: elements, embeddings aside; ``largest_grad``:
    bytes; ``low_params``, ``params``: elements stored low, and all).
    ``depths`` builds a shallow copy instead (see :func:`vlamp.models.registry.build_model`);
    ``lora`` (``train.lora``) adapts it as the trainer does: adapters trained, the
    adapted layers frozen; ``rules`` (``precision.rules``, a YAML file) are the run's own rules
    (the rules a measurement adds change no storage dtype)."""
    from vlamp.precision.freeze import frozen_modules, with_frozen

    with torch.device("meta"):
        model = build_model(config, depths)
        frozen = [*frozen, *adapt(model, lora)]
    cold_modules = frozen_modules(model, frozen) if frozen else {}
    # frozen modules are stored in the compute dtype, as MixedPrecision stores them at setup
    plan = with_frozen(plan_for(mode, rules or None), list(cold_modules))
    m = plan.mode
    method = update if update != "-" else m.default_update
    cold = {id(p) for mod in cold_modules.values() for p in mod.parameters()}
    totals = dict.fromkeys(("weights", "masters", "compensation", "grads", "optimizer"), 0.0)
    sizes = {"largest_param": 0, "largest_module": 0, "largest_grad": 0, "low_params": 0,
             "params": sum(p.numel() for p in model.parameters()), "trained": 0}
    for r in plan.resolve(model, warn_unmatched=False):
        own = list(r.module.parameters(recurse=False))
        if not isinstance(r.module, torch.nn.Embedding):  # looked up where stored: never cast up
            sizes["largest_module"] = max(sizes["largest_module"], sum(p.numel() for p in own))
        for p in own:
            dtype = r.policy.param
            size = torch.empty((), dtype=dtype).element_size()
            if id(p) in cold:
                totals["weights"] += p.numel() * size
                continue
            per = state_by_kind(dtype, m, method, 2, optimizer_state == "8bit")
            for k, v in per.items():
                totals[k] += v * p.numel()
            sizes["largest_param"] = max(sizes["largest_param"], p.numel())
            sizes["largest_grad"] = max(sizes["largest_grad"], p.numel() * size)
            sizes["low_params"] += p.numel() if dtype != torch.float32 else 0
            sizes["trained"] += p.numel()
    return totals, sizes


def state_by_depth(config: ModelConfig, mode: str, update: str, optimizer_state: str,
                   frozen: Sequence[str] = (), lora: LoraConfig | None = None,
                   rules: str | None = None) -> tuple[dict[str, float], dict[str, int]]:
    """:func:`state_bytes` of the full model from shallow meta-device builds (one layer per
    stack, one more in each), extrapolated in depth as the probes are: a model of thousands of
    layers is counted as fast as one of two. Exact for stacks of identical layers."""
    depths = stack_depths(config)
    if not depths:
        return state_bytes(config, mode, update, optimizer_state, frozen, lora=lora, rules=rules)
    base = {s: 1 for s in depths}
    one, one_sizes = state_bytes(config, mode, update, optimizer_state, frozen, base, lora, rules)
    state, sizes = dict(one), dict(one_sizes)
    for stack, n in depths.items():
        more, more_sizes = state_bytes(config, mode, update, optimizer_state, frozen,
                                       {**base, stack: 2}, lora, rules)
        for k in state:
            state[k] += (more[k] - one[k]) * (n - 1)
        for k in ("low_params", "params", "trained"):
            sizes[k] += (more_sizes[k] - one_sizes[k]) * (n - 1)
    return state, sizes


def held_bytes(state: dict[str, float]) -> float:
    """What a configuration holds through the whole step, whatever its activations: weights,
    masters, compensation and optimizer state."""
    return sum(state[k] for k in ("weights", "masters", "compensation", "optimizer"))


def unmeasured(config: ModelConfig, mode: str) -> ModeProbe:
    """A probe for a mode that was not measured (its state alone is over the budget): no
    activations, no runtime, an unknown step time (NaN)."""
    nothing = Measured({(ck, b): 0.0 for ck in (False, True) for b in (1, 2)}, {1: math.nan})
    return ModeProbe(mode, stack_depths(config), nothing, {})


def predict(candidate: Candidate, state: dict[str, float], sizes: dict[str, int],
            probe: ModeProbe, sample_bytes: int, built_here: bool = True,
            measured: bool = False) -> Prediction:
    """The candidate's peak by kind at the largest of its moments (see the module's text);
    ``built_here``: the model is built in FP32 in this memory (a CPU run; a GPU run builds it in
    the host's); ``measured``: the run measures its plan first (unless the plan is in the cache:
    ``if_cached`` predicts that run)."""
    c = candidate
    acts = probe.activations(c.micro_batch, c.checkpoint)
    lifted = c.optimizer_state == "8bit" or (c.update not in ("-", "master"))
    # a bucket closes at BUCKET elements; a larger parameter is stepped in slices of BUCKET
    bucket = BUCKET + min(sizes["largest_param"], BUCKET) if lifted else 0
    per_elem = (8 if c.update not in ("-", "master") else 0) + (16 if c.optimizer_state == "8bit" else 8)
    step_transient = bucket * per_elem if lifted else 0
    backward_transient = 8 * sizes["largest_module"] if c.mode.endswith("-storage") else 0
    accumulated = state["grads"] if c.grad_accum > 1 else 0.0
    if c.grad_accum > 1 and c.update not in ("-", "master"):
        accumulated += 4 * sizes["low_params"]  # FP32 sums of the low-precision gradients
    held = {k: int(state[k]) for k in ("weights", "masters", "compensation", "optimizer")}
    forward = {"grads": int(accumulated), "activations": int(acts),
               "transient": int(backward_transient)}
    step = {"grads": int(state["grads"]), "activations": 0, "transient": int(step_transient)}
    if c.in_backward:  # one gradient at a time, stepped as the backward goes: no step moment
        forward = {"grads": sizes["largest_grad"], "activations": int(acts),
                   "transient": int(backward_transient + step_transient)}
        step = {"grads": 0, "activations": 0, "transient": 0}
    at, moment = ("forward", forward) if sum(forward.values()) >= sum(step.values()) else ("step", step)
    data = 2 * c.micro_batch * sample_bytes  # the batch and the next one being assembled
    runtime = int(probe.runtime_bytes)
    by_kind = {**held, **moment, "data": data, "runtime": runtime}
    build = 4 * sizes.get("params", probe.params)  # every weight in FP32 before it is stored
    others = {"build": {"weights": build} if built_here else {},
              "measure": {**_measure_moment(state, sizes, build, probe, c),
                          "data": c.micro_batch * sample_bytes} if measured else {}}
    for name, kinds in others.items():
        if sum(kinds.values()) > sum(by_kind.values()) - runtime:
            at, by_kind = name, {**dict.fromkeys(KINDS, 0), **kinds, "runtime": runtime}
    timed = dataclasses.replace(probe, params=sizes.get("params", probe.params))
    seconds = math.nan if math.isnan(probe.base.seconds.get(1, 0.0)) else timed.step_seconds(c)
    cached = predict(c, state, sizes, probe, sample_bytes, built_here) if measured else None
    return Prediction(c, {k: by_kind[k] for k in KINDS}, seconds, moment=at, if_cached=cached)


def _measure_moment(state: dict[str, float], sizes: dict[str, int], fp32_weights: int,
                    probe: ModeProbe, c: Candidate) -> dict[str, int]:
    """What the measured plan's passes hold at most, before the run's setup: the model in FP32
    and a planned copy; the trained parameters' FP32 gradients (lean islands' reference) and the
    copy's; one forward's activations at the micro-batch (no checkpointing yet: the FP32 passes'
    where they save more than the mode's, as they do wherever the mode computes low); and its
    batch."""
    trained = sizes.get("trained", sizes.get("params", probe.params))
    return {"weights": int(fp32_weights + state["weights"]),
            "grads": int(4 * trained + state["grads"]),
            "activations": int(probe.measured_activations(c.micro_batch))}


def choose(predictions: Sequence[Prediction], budget: int) -> Prediction | None:
    """Marks each prediction as fitting ``budget`` or not; returns the fastest that fits (ties:
    the smaller peak), or ``None``."""
    for p in predictions:
        p.fits = p.peak <= budget
    fitting = [p for p in predictions if p.fits]
    return min(fitting, key=lambda p: (p.step_s, p.peak)) if fitting else None


def gib(n: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / 2**30:.2f}"


def table(predictions: Sequence[Prediction], budget: int, chosen: Prediction | None,
          limit: int = 16) -> str:
    """The candidates as an aligned table (GiB by kind, peak, the moment it is reached, fits,
    expected step time): the fitting ones fastest first, then the nearest misses."""
    rows = sorted(predictions, key=lambda p: (not p.fits, p.step_s if p.fits else p.peak))
    shown = rows[:limit]
    if chosen is not None and chosen not in shown:
        shown.append(chosen)
    unit, scale = ("MiB", 2**20) if max(p.peak for p in shown) < 2**31 else ("GiB", 2**30)
    head = ["configuration", *KINDS, "peak", "at", "fits", "step s"]
    body = [[("* " if p is chosen else "  ") + p.candidate.label(),
             *(f"{p.by_kind[k] / scale:.{2 if unit == 'GiB' else 0}f}" for k in KINDS),
             f"{p.peak / scale:.{2 if unit == 'GiB' else 0}f}", p.moment, "yes" if p.fits else "no",
             "-" if math.isnan(p.step_s) else f"{p.step_s:.3g}"] for p in shown]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    more = len(rows) - len(shown)
    lines.append(f"{unit}; budget {gib(budget)} GiB; {sum(p.fits for p in predictions)} of "
                 f"{len(predictions)} configurations fit" + (f" ({more} not shown)" if more > 0 else ""))
    return "\n".join(lines)


def reason(chosen: Prediction, predictions: Sequence[Prediction]) -> str:
    """One sentence: why this configuration."""
    fitting = [p for p in predictions if p.fits]
    faster = [p for p in predictions if not p.fits and p.step_s < chosen.step_s]
    text = (f"{chosen.candidate.label()}: the fastest of {len(fitting)} that fit "
            f"(predicted peak {gib(chosen.peak)} GiB, {chosen.step_s:.3g} s per step)")
    if faster:
        best = min(faster, key=lambda p: p.step_s)
        text += (f"; {best.candidate.label()} would be faster ({best.step_s:.3g} s) but needs "
                 f"{gib(best.peak)} GiB")
    return text


def sample_bytes(config: ModelConfig) -> int:
    """Bytes of one training sample as the trainer batches it (FP32 image, state, actions)."""
    c = config
    return 4 * (3 * c.image_size ** 2 + c.state_dim + c.chunk * c.action_dim) + 9 * c.max_tokens + c.chunk


def blocks_of(config: ModelConfig) -> list[str]:
    """The block classes ``train.checkpoint`` names for this model (its repeated layers)."""
    with torch.device("meta"):
        model = build_model(config, {k: 1 for k in stack_depths(config)})
    present = {type(m).__name__ for m in model.modules()}
    return [b for b in BLOCKS if b in present]


def default_update(mode: str) -> str:
    """The update method a mode uses by default, ``-`` where it stores no weight low."""
    return get_mode(mode).default_update if mode.endswith(("-true", "-storage")) else "-"


def probe(config: ModelConfig, mode: str, batch: int, log: Callable[[str], None] | None = None,
          device: torch.device | str = "cpu", frozen: Sequence[str] = (),
          lora: LoraConfig | None = None, precision: PrecisionConfig | None = None) -> ModeProbe:
    """:func:`~vlamp.train.fit_probe.probe_mode` (the copies frozen, adapted and planned as
    ``frozen``, ``lora`` and ``precision`` say), with the runtime's bytes set: the one-layer
    copy's measured peak minus the tensors :func:`predict` counts for it."""
    measured = probe_mode(config, mode, batch, log, device=device, frozen=frozen, lora=lora,
                          precision=precision)
    base = {s: 1 for s in measured.depths}
    state, sizes = state_bytes(config, mode, "-", "auto", frozen, base, lora,
                               precision.rules if precision else None)
    shallow = dataclasses.replace(measured, depths=base)
    counted = predict(Candidate(mode, default_update(mode), "auto", False, batch, 1), state, sizes,
                      shallow, sample_bytes(config),  # its peak: the steps at ``batch``
                      built_here=torch.device(device).type == "cpu").peak
    measured.runtime_bytes = max(0.0, measured.probe_peak - counted)
    return measured


__all__ = ["KINDS", "Candidate", "Prediction", "blocks_of", "candidates", "choose", "held_bytes",
           "predict", "probe", "reason", "sample_bytes", "state_bytes", "table", "unmeasured"]
