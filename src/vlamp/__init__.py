"""vlamp: train vision-language-action policies in mixed precision, and measure what it costs.

The public API is what this module exports; everything else is private.
"""

from vlamp.precision import (
    BUILTIN_RULES,
    FORMATS,
    MODE_NAMES,
    UPDATES,
    ActivationMeter,
    DynamicLossScaler,
    Format,
    Hardware,
    LossScaler,
    MixedPrecision,
    Mode,
    NoLossScaler,
    PlanTable,
    Policy,
    PrecisionPlan,
    Rule,
    StaticLossScaler,
    StepOutcome,
    UpdateSettings,
    VlampError,
    WeightUpdate,
    checkpoint_modules,
    choose_mode,
    describe_plan,
    detect,
    format_table,
    get_mode,
    measure_plan,
    measure_throughput,
    resolve_device,
    set_tf32,
    state_memory,
    to_dtype,
)

__version__ = "0.1.0"

# Training names load on first use: they pull in the simulator and the data stack, which
# ``import vlamp`` for the precision API alone should not pay for.
_LAZY = {
    "ModelConfig": "vlamp.models.config", "TinyVLA": "vlamp.models.tinyvla",
    "WordTokenizer": "vlamp.models.tokenizer", "RunConfig": "vlamp.train.config",
    "load_config": "vlamp.train.config_io", "Trainer": "vlamp.train.trainer",
    "train_step": "vlamp.train.step", "VLAPolicy": "vlamp.train.policy",
    "load_policy": "vlamp.train.policy", "evaluate": "vlamp.sim.evaluate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlamp' has no attribute {name!r}")


__all__ = [
    "BUILTIN_RULES", "FORMATS", "MODE_NAMES", "UPDATES", "ActivationMeter", "DynamicLossScaler", "Format", "Hardware",
    "LossScaler", "MixedPrecision", "Mode", "NoLossScaler", "PlanTable", "Policy", "PrecisionPlan",
    "Rule", "StaticLossScaler", "StepOutcome", "VlampError", "__version__", "checkpoint_modules",
    "choose_mode", "detect", "format_table", "get_mode", "measure_throughput", "resolve_device", "set_tf32", "state_memory", "to_dtype",
    "UpdateSettings", "WeightUpdate", "describe_plan", "measure_plan",
    *_LAZY,
]
