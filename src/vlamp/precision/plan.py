"""Per-module precision plans: ordered rules ``pattern -> policy`` resolved over a model.

Resolution walks ``model.named_modules()`` once. For each module the first rule that matches decides
its policy; a module no rule matches inherits its parent's policy, and the root inherits the mode's
default. A pattern matches a module when it globs (``fnmatchcase``) its qualified name (the root is
``""``), the name of a class in its MRO, or such a class's dotted path (``module.Class``), so
``action_head`` is exactly one module, ``action_head.*`` all below it, ``LayerNorm`` every
LayerNorm and ``transformers.*RMSNorm`` every RMSNorm class of the transformers library.
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
from vlamp.precision.files import write_text_atomic
from vlamp.precision.modes import Mode, get_mode
from vlamp.precision.policy import FP32, Policy


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern -> policy``; ``label`` names the rule in describe tables and warnings.

    ``itself=True`` marks modules that already compute in FP32 inside their own forward (Hugging
    Face's rotary embeddings and RMSNorms upcast by themselves): their weights and buffers are
    stored in FP32 (``policy.param``), but no boundary casts their inputs a second time; compute
    and output follow the parent, and ``describe`` says ``fp32 (itself)``.
    """

    pattern: str
    policy: Policy
    label: str = ""
    itself: bool = False

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
                   or fnmatch.fnmatchcase(f"{cls.__module__}.{cls.__qualname__}", self.pattern)
                   for cls in type(module).__mro__ if cls not in (nn.Module, object))


_NORMS = ("LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
          "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm")

# What OpenVLA, openpi and LeRobot keep in FP32 by hand. Modules are found by class (norms, loss
# modules), by class-name family (Hugging Face's), or by the naming convention below, which
# vlamp's own models follow.
BUILTIN_RULES: tuple[Rule, ...] = (
    # transformers' RMSNorms (Llama, Gemma, Qwen2, SmolLM, ...) and rotary embeddings cast to FP32
    # inside their forward: kept in FP32 storage, not cast again.
    Rule("transformers.*RMSNorm", FP32, "builtin:norm(RMSNorm, upcasts itself)", itself=True),
    Rule("*RotaryEmbedding", FP32, "builtin:rotary-embedding(upcasts itself)", itself=True),
    # By class-name family: a library's own norm classes (Hugging Face's LlamaRMSNorm,
    # Qwen2RMSNorm, T5LayerNorm, ...) are not subclasses of torch's, but are named like them.
    *(Rule(f"*{cls}", FP32, f"builtin:norm({cls})") for cls in _NORMS),
    Rule("*pos_embed*", FP32, "builtin:positional-embedding"),
    Rule("*position_embedding*", FP32, "builtin:positional-embedding"),
    Rule("wpe", FP32, "builtin:positional-embedding"),  # GPT-2's learned positions (and its kin)
    Rule("*.wpe", FP32, "builtin:positional-embedding"),
    # a vision tower's patch + position (+ class token) embeddings: SigLIP, DINOv2, ViT, CLIP
    Rule("*VisionEmbeddings", FP32, "builtin:patch-and-position-embeddings"),
    Rule("*PatchEmbeddings", FP32, "builtin:patch-and-position-embeddings"),
    Rule("Dinov2Embeddings", FP32, "builtin:patch-and-position-embeddings"),
    Rule("ViTEmbeddings", FP32, "builtin:patch-and-position-embeddings"),
    Rule("*time_embed*", FP32, "builtin:time-embedding"),
    Rule("*Timestep*Embedding*", FP32, "builtin:time-embedding"),
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
    itself: bool = False  # computes in FP32 inside its own forward (see Rule.itself)


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
        measured: What a measured plan (:func:`vlamp.precision.autoplan.measure_plan`) timed per
            module, kept as plain data so ``describe`` can show it and YAML can carry it.

    Example:
        >>> plan = PrecisionPlan("bf16-mixed", {"action_head.*": "fp32"})
        >>> print(describe_plan(plan, model, max_depth=1))  # doctest: +SKIP
    """

    def __init__(
        self,
        mode: str | Mode = "fp32",
        rules: Sequence[RuleSpec] | Mapping[str, str | Policy] | None = None,
        *,
        builtin_rules: bool = True,
        measured: Mapping[str, Any] | None = None,
    ) -> None:
        self.mode = get_mode(mode)
        self.user_rules = tuple(_to_rules(rules))
        self.builtin_rules = bool(builtin_rules)
        self.measured = dict(measured) if measured else None

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
            itself = False
            for i, rule in enumerate(rules):
                if rule.matches(name, module):
                    policy, decided, itself = rule.policy, rule.label, rule.itself
                    used.add(i)
                    break
            else:
                policy, decided = parent, ("inherited" if name else "mode default")
            if itself:  # stored as the rule says; computes as its parent (it upcasts by itself)
                policy = Policy(policy.param, parent.compute, parent.output)
            by_name[name] = policy
            out.append(Resolved(name, module, policy, decided, parent, itself))
        if warn_unmatched:
            for i, rule in enumerate(self.user_rules):
                if i not in used:
                    warnings.warn(f"precision rule {rule.pattern!r} matches no module of "
                                  f"{type(model).__name__}", UserWarning, stacklevel=2)
        return out

    # -- YAML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``mode``, ``builtin_rules``, ``rules`` (with their labels where they say more
        than the pattern) and, for a measured plan, ``measured``."""
        rules = [{"pattern": r.pattern, "policy": str(r.policy),
                  **({"label": r.label} if r.label != r.pattern else {})} for r in self.user_rules]
        out: dict[str, Any] = {"mode": self.mode.name, "builtin_rules": self.builtin_rules,
                               "rules": rules}
        if self.measured:
            out["measured"] = self.measured
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the plan as YAML (atomically: temporary file, then rename)."""
        import yaml

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str], mode: str | Mode | None = None) -> PrecisionPlan:
        """Reads a plan from YAML (keys ``mode``, ``builtin_rules``, ``rules``, ``measured``).

        Args:
            path: The YAML file.
            mode: The mode to use; if the file names another mode, that is an error.

        Raises:
            VlampError: If the file cannot be read or parsed, has unknown keys, bad rules, or a mode
                that conflicts with ``mode``.
        """
        where = f"rules file {os.fspath(path)!r}"
        return cls.from_dict(_read_rules_file(path, where), mode=mode, where=where)

    @classmethod
    def from_dict(cls, data: Any, mode: str | Mode | None = None, where: str = "plan") -> PrecisionPlan:
        """The inverse of :meth:`to_dict`, validated; ``where`` names the source in errors."""
        if not isinstance(data, dict):
            raise VlampError(f"{where}: expected a mapping with keys {', '.join(_PLAN_KEYS)}")
        unknown = set(data) - set(_PLAN_KEYS)
        if unknown:
            raise VlampError(f"{where}: unknown keys {sorted(unknown)}; legal: {', '.join(_PLAN_KEYS)}")
        try:  # the mode is normalised once, here; the plan keeps the Mode
            file_mode = get_mode(data["mode"]) if data.get("mode") is not None else None
            mode = get_mode(mode) if mode is not None else None
        except VlampError as e:
            raise VlampError(f"{where}: {e}") from None
        if mode is not None and file_mode is not None and mode.name != file_mode.name:
            raise VlampError(f"{where} is for mode {file_mode.name!r}, "
                             f"but mode {mode.name!r} was asked for")
        rules = data.get("rules") or []
        if not isinstance(rules, list) or not all(
                isinstance(r, dict) and {"pattern", "policy"} <= set(r) <= {"pattern", "policy", "label"}
                for r in rules):
            raise VlampError(f"{where}: 'rules' must be a list of "
                             "{pattern: ..., policy: ...} entries (optionally with a label)")
        measured = data.get("measured")
        if measured is not None and not isinstance(measured, dict):
            raise VlampError(f"{where}: 'measured' must be a mapping")
        try:
            return cls(mode or file_mode or "fp32",
                       [Rule(r["pattern"], Policy.parse(str(r["policy"])), str(r.get("label") or ""))
                        for r in rules],
                       builtin_rules=bool(data.get("builtin_rules", True)), measured=measured)
        except VlampError as e:
            raise VlampError(f"{where}: {e}") from None


def plan_for(mode: str | Mode | PrecisionPlan, rules: Any, builtin_rules: bool = True,
             device: Any = None) -> PrecisionPlan:
    """The plan ``MixedPrecision`` runs: a ready plan as it is, else ``rules`` (or a YAML rules
    file) for the mode, normalised once here (``"auto"`` decided for ``device``, the CUDA device
    when present by default).

    Raises:
        VlampError: On rules beside a ready plan, or a rules file for another mode.
    """
    if isinstance(mode, PrecisionPlan):
        if rules is not None:
            raise VlampError("MixedPrecision: a ready PrecisionPlan carries its rules; pass rules=None")
        return mode
    if isinstance(rules, PrecisionPlan):
        raise VlampError("MixedPrecision: pass a ready PrecisionPlan as the first argument "
                         "(MixedPrecision(plan)), not as rules")
    mode = get_mode(mode, device)  # "auto": for the device it will run on, not whatever is here
    if isinstance(rules, (str, os.PathLike)):
        return PrecisionPlan.load(rules, mode=mode)
    return PrecisionPlan(mode, rules, builtin_rules=builtin_rules)


_PLAN_KEYS = ("mode", "builtin_rules", "rules", "measured")


def rules_file_mode(path: str | os.PathLike[str]) -> str | None:
    """The mode a rules file is for (its ``mode`` key), or ``None`` where it names none.

    Raises:
        VlampError: If the file is not a valid rules file (as :meth:`PrecisionPlan.load` says).
    """
    where = f"rules file {os.fspath(path)!r}"
    data = _read_rules_file(path, where)
    PrecisionPlan.from_dict(data, where=where)  # every error of the file, in one line
    return get_mode(data["mode"]).name if data.get("mode") is not None else None


def _read_rules_file(path: str | os.PathLike[str], where: str) -> Any:
    """A rules file's YAML, read and parsed; a file that cannot be is one line (``where`` names it)."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except OSError as e:
        raise VlampError(f"{where}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VlampError(f"{where}: not valid YAML ({first})") from None


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

