"""vlamp: train vision-language-action policies in mixed precision, and measure what it costs.

The public API is what this module exports; everything else is private.
"""

from vlamp.precision import (
    BUILTIN_RULES,
    FORMATS,
    MODE_NAMES,
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
    VlampError,
    choose_mode,
    detect,
    format_table,
    get_mode,
    measure_throughput,
    to_dtype,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_RULES", "FORMATS", "MODE_NAMES", "DynamicLossScaler", "Format", "Hardware",
    "LossScaler", "MixedPrecision", "Mode", "NoLossScaler", "PlanTable", "Policy", "PrecisionPlan",
    "Rule", "StaticLossScaler", "StepOutcome", "VlampError", "__version__", "choose_mode", "detect",
    "format_table", "get_mode", "measure_throughput", "to_dtype",
]
