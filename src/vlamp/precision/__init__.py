"""vlamp's precision core. It imports nothing else from vlamp, so it can be taken alone into any loop."""

from vlamp.precision.describe import PlanTable
from vlamp.precision.dtypes import to_dtype
from vlamp.precision.errors import VlampError
from vlamp.precision.formats import FORMATS, Format, format_table
from vlamp.precision.front import MixedPrecision
from vlamp.precision.hardware import (
    Hardware,
    choose_mode,
    detect,
    measure_throughput,
    resolve_device,
    set_tf32,
)
from vlamp.precision.memory import ActivationMeter, checkpoint_modules, state_memory
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
from vlamp.precision.update import UPDATES

__all__ = [
    "BUILTIN_RULES", "FORMATS", "MODE_NAMES", "UPDATES", "ActivationMeter", "DynamicLossScaler",
    "Format", "Hardware",
    "LossScaler", "MixedPrecision", "Mode", "NoLossScaler", "PlanTable", "Policy", "PrecisionPlan",
    "Rule", "StaticLossScaler", "StepOutcome", "VlampError", "choose_mode", "detect",
    "checkpoint_modules", "format_table", "get_mode", "measure_throughput", "resolve_device",
    "set_tf32", "state_memory", "to_dtype",
]
