"""Per-module precision plans: ordered rules ``pattern -> policy`` resolved over a model.

Resolution walks ``model.named_modules()`` once. For each module the first rule that matches decides
its policy; a module no rule matches inherits its parent's policy, and the root inherits the mode's
default. A pattern matches a module when it globs (``fnmatchcase``) its qualified name (the root is
``""``) or the name of a class in its MRO, so ``action_head`` is exactly one module,
``action_head.*`` all below it, and ``LayerNorm`` every LayerNorm.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from vlamp.precision.errors import VlampError
from vlamp.precision.modes import Mode, get_mode
from vlamp.precision.policy import FP32, Policy


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern -> policy``; ``label`` names the rule in describe tables and warnings."""

    pattern: str
    policy: Policy
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise VlampError(f"Rule: pattern must be a non-empty string, got {self.pattern!r}")
        if isinstance(self.policy, str):
            object.__setattr__(self, "policy", Policy.parse(self.policy))
        if not self.label:
            object.__setattr__(self, "label", self.pattern)

    def matches(self, qualname: str, module: nn.Module) -> bool:
        if fnmatch.fnmatchcase(qualname, self.pattern):
            return True
        return any(fnmatch.fnmatchcase(cls.__name__, self.pattern)
                   for cls in type(module).__mro__ if cls not in (nn.Module, object))


_NORMS = ("LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
          "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm")

# What OpenVLA, openpi and LeRobot keep in FP32 by hand. Modules are found by class (norms, loss
# modules) or by the naming convention below, which vlamp's own models follow.
BUILTIN_RULES: tuple[Rule, ...] = (
    *(Rule(cls, FP32, f"builtin:norm({cls})") for cls in _NORMS),
    Rule("*pos_embed*", FP32, "builtin:positional-embedding"),
    Rule("*time_embed*", FP32, "builtin:time-embedding"),
    Rule("*time_sampler*", FP32, "builtin:noise-time-sampling"),
    Rule("*action_out*", FP32, "builtin:action-output"),
    Rule("*Loss", FP32, "builtin:loss"),
    Rule("*loss*", FP32, "builtin:loss"),
)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The outcome of resolution for one module."""

    name: str
    module: nn.Module
    policy: Policy
    decided_by: str  # a rule label, "inherited", or "mode default"
    parent_policy: Policy


RuleSpec = Rule | tuple[str, str | Policy]


class PrecisionPlan:
    """A mode plus ordered rules: which precision every module of a model runs in.

    User rules come first and so override the built-in VLA-safe rules, which follow when
    ``builtin_rules`` is true.

    Args:
        mode: The mode whose default policy applies where no rule decides.
        rules: ``Rule`` objects, ``(pattern, policy)`` pairs, or a ``{pattern: policy}`` mapping;
            a policy may be a grammar string (``"fp32"``, ``"p=fp32,c=bf16"``).
        builtin_rules: Whether the FP32 islands of :data:`BUILTIN_RULES` apply.

    Example:
        >>> plan = PrecisionPlan("bf16-mixed", {"action_head.*": "fp32"})
        >>> print(plan.describe(model, max_depth=1))  # doctest: +SKIP
    """

    def __init__(
        self,
        mode: str | Mode = "fp32",
        rules: Sequence[RuleSpec] | Mapping[str, str | Policy] | None = None,
        *,
        builtin_rules: bool = True,
    ) -> None:
        self.mode = get_mode(mode)
        self.user_rules = tuple(_to_rules(rules))
        self.builtin_rules = bool(builtin_rules)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.user_rules + (BUILTIN_RULES if self.builtin_rules else ())

    def resolve(self, model: nn.Module, *, warn_unmatched: bool = True) -> list[Resolved]:
        """Decides the policy of every module of ``model`` (in ``named_modules`` order).

        Warns (``UserWarning``) for each user rule that matches no module.
        """
        default = self.mode.default_policy
        by_name: dict[str, Policy] = {}
        used: set[int] = set()
        out: list[Resolved] = []
        rules = self.rules
        for name, module in model.named_modules():
            parent = by_name[name.rpartition(".")[0]] if name else default
            for i, rule in enumerate(rules):
                if rule.matches(name, module):
                    policy, decided = rule.policy, rule.label
                    used.add(i)
                    break
            else:
                policy, decided = parent, ("inherited" if name else "mode default")
            by_name[name] = policy
            out.append(Resolved(name, module, policy, decided, parent))
        if warn_unmatched:
            for i, rule in enumerate(self.user_rules):
                if i not in used:
                    warnings.warn(f"precision rule {rule.pattern!r} matches no module of "
                                  f"{type(model).__name__}", UserWarning, stacklevel=2)
        return out

    def describe(self, model: nn.Module, max_depth: int | None = None):
        """The per-module table: storage / compute / output / grad / optimizer-state dtype, parameter
        count and deciding rule. Rows below ``max_depth`` are folded into their ancestor.

        Returns:
            A :class:`vlamp.precision.describe.PlanTable`; ``str()`` renders it.
        """
        from vlamp.precision.describe import PlanTable

        return PlanTable.build(self.resolve(model, warn_unmatched=False), self.mode, max_depth)

    # -- YAML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.name, "builtin_rules": self.builtin_rules,
                "rules": [{"pattern": r.pattern, "policy": str(r.policy)} for r in self.user_rules]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the plan as YAML (atomically: temporary file, then rename)."""
        import yaml

        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], mode: str | Mode | None = None) -> PrecisionPlan:
        """Reads a plan from YAML (keys ``mode``, ``builtin_rules``, ``rules``).

        Args:
            path: The YAML file.
            mode: The mode to use; if the file names another mode, that is an error.

        Raises:
            VlampError: If the file cannot be read or parsed, has unknown keys, bad rules, or a mode
                that conflicts with ``mode``.
        """
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise VlampError(f"rules file {os.fspath(path)!r}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise VlampError(f"rules file {os.fspath(path)!r}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise VlampError(f"rules file {os.fspath(path)!r}: expected a mapping with keys "
                             "mode, builtin_rules, rules")
        unknown = set(data) - {"mode", "builtin_rules", "rules"}
        if unknown:
            raise VlampError(f"rules file {os.fspath(path)!r}: unknown keys {sorted(unknown)}; "
                             "legal: mode, builtin_rules, rules")
        file_mode = data.get("mode")
        if mode is not None and file_mode is not None and get_mode(mode).name != get_mode(file_mode).name:
            raise VlampError(f"rules file {os.fspath(path)!r} is for mode {file_mode!r}, "
                             f"but mode {get_mode(mode).name!r} was asked for")
        rules = data.get("rules") or []
        if not isinstance(rules, list) or not all(
                isinstance(r, dict) and set(r) == {"pattern", "policy"} for r in rules):
            raise VlampError(f"rules file {os.fspath(path)!r}: 'rules' must be a list of "
                             "{pattern: ..., policy: ...} entries")
        try:
            return cls(mode or file_mode or "fp32",
                       [(r["pattern"], str(r["policy"])) for r in rules],
                       builtin_rules=bool(data.get("builtin_rules", True)))
        except VlampError as e:
            raise VlampError(f"rules file {os.fspath(path)!r}: {e}") from None


def _to_rules(rules: Sequence[RuleSpec] | Mapping[str, str | Policy] | None) -> Iterable[Rule]:
    if rules is None:
        return
    items = rules.items() if isinstance(rules, Mapping) else rules
    for item in items:
        if isinstance(item, Rule):
            yield item
        elif isinstance(item, tuple) and len(item) == 2:
            pattern, policy = item
            yield Rule(pattern, policy if isinstance(policy, Policy) else Policy.parse(policy))
        else:
            raise VlampError(f"rules: expected Rule or (pattern, policy), got {item!r}")

