"""The training configuration: typed dataclasses, one a section, each checking its own values where
they enter (:mod:`vlamp.train.config_io` reads them from YAML and ``key=value`` overrides)."""

from __future__ import annotations

import dataclasses

from vlamp.models.config import ModelConfig
from vlamp.precision.diagnostics import parse_every
from vlamp.precision.errors import VlampError
from vlamp.precision.hardware import DEVICE_NAMES, check_device_name
from vlamp.precision.memory import parse_size
from vlamp.precision.modes import get_mode
from vlamp.precision.weight_update import OPTIMIZER_STATES, check_update
from vlamp.sim import evaluate as evaluation
from vlamp.sim.tasks import resolve_tasks


@dataclasses.dataclass
class DatasetConfig:
    """Attributes:
        path: A LeRobot v3.0 dataset directory; empty: the demonstrations of ``tasks``, generated
            into the user cache on first use.
        tasks: With no ``path``: the tasks (and suites: ``mt10``, ``mt50``) whose scripted-expert
            demonstrations are generated; empty: the default 6-task suite.
        episodes_per_task: With no ``path``: demonstrations generated per task.
        image_size: With no ``path``: the side of the generated camera images (the model's
            ``image_size`` follows the dataset).
        val_episodes: Episodes per task held out for the validation loss.
        augment: Random-shift augmentation of training images (DrQ's: pad 4, random crop). Off by
            default: the camera is fixed, so where an object is in the image says where it is on
            the table, and shifting images by up to 4 px blurs exactly that (the README's ablation
            measures what it cost).
        stream: Keep the frames on disk: decoded once into the user cache and read per batch, so
            memory does not grow with the dataset (a dataset larger than RAM trains); off decodes
            them all into memory before the first step.
    """

    path: str = ""
    tasks: str = ""
    episodes_per_task: int = 25
    image_size: int = 64
    val_episodes: int = 2
    augment: bool = False
    stream: bool = True

    def __post_init__(self) -> None:
        if self.episodes_per_task < 1 or self.image_size < 16 or self.val_episodes < 0:
            raise VlampError(f"dataset.episodes_per_task must be >= 1, dataset.image_size >= 16 and "
                             f"dataset.val_episodes >= 0, got {self.episodes_per_task}, "
                             f"{self.image_size} and {self.val_episodes}")
        if self.tasks and self.path:
            raise VlampError("dataset.tasks names demonstrations to generate; dataset.path "
                             "names a dataset to read: give one of them")
        if self.tasks:
            try:  # an unknown name fails here, before any generation
                resolve_tasks(self.tasks)
            except VlampError as e:
                raise VlampError(f"dataset.tasks: {e}") from None


@dataclasses.dataclass
class LossScaleConfig:
    """The loss scaler's settings (for ``scaler=dynamic``, or ``static``: ``init_scale`` only).
    The defaults are ``torch.amp.GradScaler``'s.

    Attributes:
        init_scale: The first scale.
        growth_factor: Factor after ``growth_interval`` finite steps in a row.
        backoff_factor: Factor on overflow.
        growth_interval: Finite steps in a row before growing.
        min_scale: Floor of the scale (0: none). Without a floor a long overflow streak can
            collapse the scale until every gradient is zero.
        max_scale: Ceiling of the scale (0: none).
        hysteresis: Overflows tolerated before backing off (DeepSpeed's meaning).
    """

    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 0.0
    max_scale: float = 0.0
    hysteresis: int = 1

    def settings(self) -> dict[str, float | int | None]:
        """``DynamicLossScaler``'s arguments; empty when every value is the default."""
        if self == LossScaleConfig():
            return {}
        out = dataclasses.asdict(self)
        out["min_scale"] = self.min_scale or None
        out["max_scale"] = self.max_scale or None
        return out


@dataclasses.dataclass
class PrecisionConfig:
    """Attributes:
        mode: ``fp32``, ``bf16-mixed``, ``fp16-mixed``, ``bf16-true``, ``fp16-true`` or ``auto``.
        scaler: ``dynamic``, ``static``, ``none``; empty for the mode's default.
        loss_scale: The scaler's settings (``precision.loss_scale.min_scale=1``, ...).
        rules: A YAML file of per-module rules (see ``vlamp plan --rules``); empty for none.
        measure: Before training, time every low-precision module on a real batch in low precision
            and in FP32 and keep FP32 where low precision is slower on this machine (in the
            ``-true`` modes FP32 compute only, the weights still stored in low precision; cached;
            see ``vlamp plan --auto``); with ``mode=auto`` the measured step also decides between
            the low-precision mode and FP32. Off: the mode's plan as is (``auto`` from the hardware
            table alone).
        tf32: On CUDA, let FP32 matmuls and convolutions (the fp32 mode, and FP32 islands) run
            on TF32 tensor cores; off keeps them IEEE FP32. No effect on CPUs.
        diagnostics: ``off`` or ``every:N``: on every N-th step (and the first) record per module
            the overflow, underflow and headroom of activations and gradients and the updates
            lost to rounding, into metrics.jsonl and TensorBoard; ``vlamp diagnose RUN`` reports
            them.
        sensitivity: With ``measure``: also measure each module's error in low precision against
            FP32 on a real batch and keep in FP32 those above this relative error, instead of the
            built-in islands (e.g. 0.02); 0 turns it off.
        lean_islands: With ``measure``: the FP32 islands (norms, positional and time embeddings)
            hand on the low-precision dtype where that is measured to grow the plan's gradient
            error against FP32 by at most this fraction (0.25: a quarter; the error moves by
            about 5% from batch to batch), saving the FP32 activations of the element-wise ops
            after them; 0 keeps every island handing on FP32.
        update: How weights stored in low precision (``bf16-true``, ``fp16-true``,
            ``bf16-storage``) are updated: ``auto`` (the mode's own: ``master`` in the ``-true``
            modes, ``stochastic`` in ``bf16-storage``), ``master`` (FP32 master copies: 18 bytes
            per parameter with AdamW), ``kahan`` (a
            compensation buffer in the weight's dtype, BF16 moments: 10), ``stochastic``
            (stochastic rounding into BF16, BF16 moments: 8) or ``naive`` (round to nearest: 8,
            loses updates below the format's resolution).
        optimizer_state: ``auto`` (FP32 moments beside FP32 weights and masters, the weight's
            dtype without masters) or ``8bit`` (AdamW's moments block-wise quantized to 8 bits,
            2.03 bytes per parameter instead of 8; with any update method).
        grad_accum: Dtype gradients of several micro-batches (``train.grad_accum``) are summed in
            for weights stored in low precision: ``fp32`` or ``storage`` (the weight's dtype).
        step_in_backward: Step each weight inside the backward as soon as its gradient is made,
            and free the gradient: gradients never coexist (with bf16 weights and 8-bit moments,
            4 bytes per parameter instead of 6). Needs ``train.grad_accum=1``,
            ``train.clip_grad_norm=0``, no loss scaler, and FP32 weights or an update without
            masters (``kahan``, ``stochastic``, ``naive``).
    """

    mode: str = "auto"
    scaler: str = ""
    rules: str = ""
    measure: bool = True
    tf32: bool = False
    diagnostics: str = "off"
    sensitivity: float = 0.0
    lean_islands: float = 0.25
    update: str = "auto"
    optimizer_state: str = "auto"
    grad_accum: str = "fp32"
    step_in_backward: bool = False
    loss_scale: LossScaleConfig = dataclasses.field(default_factory=LossScaleConfig)

    def __post_init__(self) -> None:
        parse_every(self.diagnostics, what="precision.diagnostics")
        if self.sensitivity < 0 or (self.sensitivity and not self.measure):
            raise VlampError(f"precision.sensitivity must be 0 (off) or a relative error > 0 with "
                             f"precision.measure=true, got {self.sensitivity}")
        if not self.lean_islands >= 0:
            raise VlampError(f"precision.lean_islands must be a fraction >= 0 (0: off), got "
                             f"{self.lean_islands}")
        if self.mode != "auto":
            get_mode(self.mode)  # an unknown name fails here, before any loading
        check_update(self.update, self.grad_accum, where="precision")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise VlampError(f"precision.optimizer_state must be one of "
                             f"{', '.join(OPTIMIZER_STATES)}, got {self.optimizer_state!r}")


@dataclasses.dataclass
class LoraConfig:
    """Attributes:
        rank: Rank of the adapters; 0 (the default) trains the model itself.
        alpha: The adapters' output is scaled by ``alpha / rank``.
        targets: The linear layers adapted (qualified names or class names, globs, e.g.
            ``["trunk.*.qkv", "trunk.*.proj"]``); their weights are frozen and, in a ``-mixed``
            mode, stored in the compute dtype (see :mod:`vlamp.models.lora`).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 0 or (self.rank > 0 and not self.targets) or self.alpha <= 0:
            raise VlampError(f"train.lora: rank must be >= 0 (0: no adapters) and, with a rank, "
                             f"targets must name linear layers and alpha be > 0; got rank "
                             f"{self.rank}, alpha {self.alpha}, targets {self.targets}")


@dataclasses.dataclass
class TrainConfig:
    """Attributes:
        steps: Optimizer steps to run (skipped steps count); docs/measurements.md gives what
            the default reaches and how long it takes.
        batch_size: Samples per micro-batch.
        grad_accum: Micro-batches per step.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        clip_grad_norm: Clip the unscaled gradient norm to this; 0 turns clipping off.
        ema_decay: Keep an exponential moving average of the weights (e.g. 0.999) for evaluation;
            0 turns it off.
        seed: Seeds the model init, the batch order, augmentation and noise.
        log_every: Steps between TensorBoard/metrics records.
        val_every: Steps between validation losses (0: only at the end).
        save_every: Steps between checkpoints (the last step is always saved).
        keep_last: Checkpoints kept on disk.
        threads: Torch CPU threads (0: torch's default).
        device: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
            ``cuda:N``. The model, optimizer state and batches live there; closed-loop evaluation
            runs the policy there and the simulator on the CPU.
        compile: Run the training forward/backward through ``torch.compile`` (the precision plan's
            boundaries are traced with it). Costs compile time at the start.
        compile_backend: ``inductor`` (default: generated kernels) or another ``torch.compile``
            backend, e.g. ``aot_eager`` (traced, eager kernels: seconds of compile, no speed-up).
        checkpoint: Modules that recompute their forward in the backward instead of saving their
            activations (activation checkpointing): patterns on qualified names or class names, as
            precision rules take them, e.g. ``[vision.stages.0, vision.stages.1]`` or
            ``[ConvStage]``. Less memory, one more forward of those modules per step.
        lora: LoRA adapters instead of training the adapted layers themselves
            (``train.lora.rank=8 train.lora.targets=[trunk.*.qkv]``).
        freeze: Modules that are not trained (patterns as ``checkpoint``'s, e.g. ``[vision]``): no
            gradients, no optimizer state, and in a ``-mixed`` mode their weights are stored in
            the compute dtype (2 bytes per parameter instead of 16).
        memory_budget: Memory the run may use (``24GiB``, ``500MB``; ``auto``: what this machine
            or GPU has free now; empty: no check). The peak is predicted before the model is
            built (``vlamp fit``): with ``precision.mode=auto`` the run trains with the fastest
            configuration that fits; otherwise a run predicted not to fit is refused.
    """

    steps: int = 1200
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    clip_grad_norm: float = 1.0
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    save_every: int = 500
    keep_last: int = 3
    threads: int = 0
    device: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    checkpoint: list[str] = dataclasses.field(default_factory=list)
    freeze: list[str] = dataclasses.field(default_factory=list)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    memory_budget: str = ""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise VlampError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_every", "save_every", "threads"):
            if getattr(self, name) < 0:
                raise VlampError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        try:
            check_device_name(self.device)
        except VlampError:
            raise VlampError(f"train.device must be one of {DEVICE_NAMES}, got {self.device!r}") from None
        if not 0.0 <= self.ema_decay < 1.0:
            raise VlampError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.clip_grad_norm < 0:
            raise VlampError("train.lr must be > 0 and train.clip_grad_norm >= 0")
        if self.compile_backend != "inductor":
            _check_compile_backend(self.compile_backend)
        if self.memory_budget not in ("", "auto"):
            parse_size(self.memory_budget)


@dataclasses.dataclass
class EvalConfig:
    """Attributes:
        every: Steps between closed-loop evaluations during training (0: only at the end).
        episodes: Episodes per task.
        final: Evaluate after the last step.
        replan_every: Steps between queries of the policy (at most a chunk).
        ensemble: Temporal ensembling weight ``k``: each step's action averages what every chunk
            predicted for it, weights ``exp(-k * i)`` from the oldest; 0 executes each chunk's
            actions as predicted.
        max_steps: Episode limit; 0 (the default): 200 steps on the default suite's tasks,
            Meta-World's own 500 otherwise (:func:`vlamp.sim.evaluate.episode_limit`).
        workers: Processes the tasks are spread over (0: one per core; 1: in the training
            process). Same episodes and seeds either way. The processes are spawned: a script of
            your own that trains must keep its work under ``if __name__ == "__main__":``.
    """

    every: int = 0
    episodes: int = evaluation.EPISODES
    final: bool = True
    replan_every: int = evaluation.REPLAN_EVERY
    ensemble: float = evaluation.ENSEMBLE
    max_steps: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.replan_every < 1 or self.ensemble < 0:
            raise VlampError(f"eval.replan_every must be >= 1 and eval.ensemble >= 0, got "
                             f"{self.replan_every} and {self.ensemble}")
        if self.episodes < 1 or self.every < 0 or self.workers < 0 or self.max_steps < 0:
            raise VlampError(f"eval.episodes must be >= 1 and eval.every, eval.workers, "
                             f"eval.max_steps >= 0, got {self.episodes}, {self.every}, "
                             f"{self.workers}, {self.max_steps}")


@dataclasses.dataclass
class DistributedConfig:
    """How a run launched by ``torchrun --nproc-per-node N -m vlamp train ...`` splits the work
    (ignored in one process). ``train.batch_size`` is per rank: the effective batch is
    ``batch_size x grad_accum x N``.

    Attributes:
        strategy: ``ddp`` (every rank holds the model; gradients all-reduced) or ``fsdp``
            (FSDP2: parameters, gradients and optimizer state sharded; the precision plan decides
            each shard group's gathered dtype).
        reduce_dtype: Dtype gradients are reduced in: ``fp32``, or ``bf16``/``fp16`` to halve
            the traffic (a recorded loss of precision in the sum).
    """

    strategy: str = "ddp"
    reduce_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise VlampError(f"distributed.strategy must be one of ddp, fsdp, got {self.strategy!r}")
        if self.reduce_dtype not in ("fp32", "bf16", "fp16"):
            raise VlampError(f"distributed.reduce_dtype must be one of fp32, bf16, fp16, got "
                             f"{self.reduce_dtype!r}")


@dataclasses.dataclass
class RunConfig:
    """Everything a training run needs; ``vlamp train --help`` lists every key.

    Attributes:
        output_dir: The run directory: config, checkpoints, TensorBoard events, metrics.
        resume: Continue from the newest valid checkpoint in ``output_dir``.

    Raises:
        VlampError: When built (from a file, overrides or ``dataclasses.replace``) with a value
            out of range, naming the key and its legal values: each section checks its own.
    """

    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    output_dir: str = "runs/train"
    resume: bool = False

    def __post_init__(self) -> None:  # each section checks its own keys; here what spans two
        t = self.train
        if self.precision.step_in_backward and (t.grad_accum != 1 or t.clip_grad_norm):
            raise VlampError(f"precision.step_in_backward steps each weight at its gradient: it "
                             f"needs train.grad_accum=1 and train.clip_grad_norm=0, got "
                             f"{t.grad_accum} and {t.clip_grad_norm}")


def _check_compile_backend(name: str) -> None:
    """Raises a one-line :class:`VlampError` unless ``torch.compile`` knows the backend ``name``."""
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):  # debug ones too (aot_eager)
        usual = [*torch._dynamo.list_backends(), "aot_eager", "eager"]
        raise VlampError(f"train.compile_backend must be a torch.compile backend ({', '.join(usual)}, "
                         f"...: torch._dynamo.list_backends(exclude_tags=())), got {name!r}")
