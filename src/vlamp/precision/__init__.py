"""vlamp's precision core. It imports nothing else from vlamp, so it can be taken alone into any loop."""

from vlamp.precision.autoplan import measure_plan
from vlamp.precision.describe import PlanTable, describe_plan
from vlamp.precision.dtypes import to_dtype
from vlamp.precision.errors import VlampError
from vlamp.precision.formats import FORMATS, Format, format_table
from vlamp.precision.hardware import (
    Hardware,
    choose_mode,
    detect,
    measure_throughput,
    resolve_device,
    set_tf32,
)
from vlamp.precision.memory import ActivationMeter, checkpoint_modules, state_memory
from vlamp.precision.mixed_precision import MixedPrecision
from vlamp.precision.modes import MODE_NAMES, Mode, get_mode
from vlamp.precision.plan import BUILTIN_RULES, PrecisionPlan, Rule
from vlamp.precision.policy import Policy
from vlamp.precision.scaler import (
    DynamicLossScaler,
    LossScaler,
    NoLossScaler,
    StaticLossScaler,
    StepOutcome,
)
from vlamp.precision.weight_update import UPDATES, UpdateSettings, WeightUpdate

__all__ = [
    "BUILTIN_RULES", "FORMATS", "MODE_NAMES", "UPDATES", "ActivationMeter", "DynamicLossScaler",
    "Format", "Hardware",
    "LossScaler", "MixedPrecision", "Mode", "NoLossScaler", "PlanTable", "Policy", "PrecisionPlan",
    "Rule", "StaticLossScaler", "StepOutcome", "VlampError", "choose_mode", "detect",
    "checkpoint_modules", "format_table", "get_mode", "measure_throughput", "resolve_device",
    "set_tf32", "state_memory", "to_dtype", "UpdateSettings", "WeightUpdate", "describe_plan",
    "measure_plan",
]
