"""A precision plan turned into FSDP2 shard groups, each with its own ``MixedPrecisionPolicy``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) all-gathers a group's parameters before its forward
and reduce-scatters its gradients after its backward, each in one dtype per group. The plan says
which dtype each module may be gathered in without changing what it computes:

- A ``Linear``/``Conv`` whose plan computes in low precision is gathered in that dtype: autocast
  would cast its FP32 weight to it anyway, so gathering the cast halves the traffic and computes
  the same bits.
- Everything else keeps the storage dtype (FP32 in the mixed modes): norms, position and time
  embeddings, the action output (the plan's FP32 islands), and also token embeddings and bare
  parameters, which autocast does not cast (a bf16 copy would change their outputs).
- Gradients are reduced in FP32 (``reduce_dtype``) unless asked otherwise: the sum of many ranks'
  low-precision gradients is where precision would be lost.

Groups follow the model's blocks (the items of every ``ModuleList``, then the root's children, then
the root). Inside a block, the modules that must stay FP32 form one extra group (``fully_shard`` of
a list of modules), so a block costs two collectives, not one per norm. Inputs are not cast by FSDP
(``cast_forward_inputs=False``): autocast and the plan's boundaries already decide every compute
dtype, exactly as in one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from vlamp.precision.dtypes import dtype_name
from vlamp.precision.errors import VlampError
from vlamp.precision.plan import Resolved

# Modules whose weights autocast casts to the compute dtype before use (its "lower precision" list:
# linear, convolutions).
CAST_BY_AUTOCAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                    nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """One FSDP2 group: its modules, the dtype its parameters travel in, the dtype its gradients
    are reduced in, and why.

    Attributes:
        name: The block's qualified name; ``<block> (fp32 part)`` for the FP32 modules split out
            of a block; ``(root)`` for the model itself.
        modules: Qualified names of the modules handed to ``fully_shard`` together.
        param_dtype: Dtype of the all-gathered parameters (what forward and backward use).
        reduce_dtype: Dtype the gradients are reduce-scattered in.
        num_params: Parameters the group shards (not those of groups inside it).
    """

    name: str
    modules: tuple[str, ...]
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    num_params: int

    def line(self) -> str:
        return (f"{self.name}: {self.num_params:,} params gathered in {dtype_name(self.param_dtype)}, "
                f"gradients reduced in {dtype_name(self.reduce_dtype)}")


def _blocks(model: nn.Module) -> list[str]:
    """Names of the model's blocks, deepest first: items of every ModuleList holding parameters
    (transformer layers, conv stages), then the root's children, then the root ("")."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.ModuleList)]
    items = [f"{n}.{k}" for n in names for k, _ in model.get_submodule(n).named_children()]
    tops = [n for n, _ in model.named_children()]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    ordered = sorted(set(items), key=lambda n: (-n.count("."), order[n])) + [t for t in tops if t not in items]
    return [n for n in ordered if any(True for _ in model.get_submodule(n).parameters())] + [""]


def plan_groups(model: nn.Module, resolved: Sequence[Resolved],
                reduce_dtype: torch.dtype = torch.float32) -> list[tuple[ShardGroup, list[nn.Module]]]:
    """The shard groups of a model set up by a plan, in the order ``fully_shard`` must see them
    (inner first), each with its modules.

    Args:
        model: The model (plan applied, not yet sharded).
        resolved: The plan resolved on that model (``PrecisionPlan.resolve``).
        reduce_dtype: Dtype of gradient reduction for every group.
    """
    policy = {r.name: r.policy for r in resolved}
    blocks = _blocks(model)
    owner: dict[str, str] = {}  # module name -> the innermost block holding it
    for name, _ in model.named_modules():
        owner[name] = next(b for b in blocks if b == "" or name == b or name.startswith(b + "."))
    out: list[tuple[ShardGroup, list[nn.Module]]] = []
    for block in blocks:
        members = [(n, m) for n, m in model.named_modules() if owner[n] == block
                   and any(True for _ in m.parameters(recurse=False))]
        low, keep = [], []
        for n, m in members:
            p = policy[n]
            if p.param == torch.float32 and p.compute != torch.float32 and isinstance(m, CAST_BY_AUTOCAST):
                low.append((n, m, p.compute))
            else:
                keep.append((n, m, p.param))
        label = block or "(root)"
        stored = {dt for _, _, dt in keep}
        low_dtypes = {dt for _, _, dt in low}
        if len(stored) > 1 or len(low_dtypes) > 1:
            raise VlampError(f"FSDP: block {label!r} stores parameters in "
                             f"{sorted(dtype_name(d) for d in stored | low_dtypes)}; one group "
                             f"gathers one dtype. Give the block one storage dtype in the plan")
        count = lambda group: sum(p.numel() for _, m, _ in group for p in m.parameters(recurse=False))  # noqa: E731
        block_module = model.get_submodule(block) if block else model
        if low and keep:
            # The block's own module must lead its group (its hooks gather); the FP32 part is split out.
            if block and any(n == block for n, _, _ in keep):
                raise VlampError(f"FSDP: block {label!r} holds FP32 parameters of its own beside "
                                 f"low-precision layers; rule the block FP32 or move the parameters")
            fp32 = [m for _, m, _ in keep]
            out.append((ShardGroup(f"{label} (fp32 part)", tuple(n or "(root)" for n, _, _ in keep),
                                   stored.pop(), reduce_dtype, count(keep)), fp32))
            out.append((ShardGroup(label, (label,), low_dtypes.pop(), reduce_dtype, count(low)),
                        [block_module]))
        elif low:
            out.append((ShardGroup(label, (label,), low_dtypes.pop(), reduce_dtype, count(low)),
                        [block_module]))
        elif keep or not block:
            dtype = stored.pop() if stored else torch.float32
            out.append((ShardGroup(label, (label,), dtype, reduce_dtype, count(keep)), [block_module]))
    return out


def shard_model(model: nn.Module, resolved: Sequence[Resolved], *, mesh=None,
                reduce_dtype: torch.dtype = torch.float32) -> list[ShardGroup]:
    """Shards ``model`` in place with FSDP2 along :func:`plan_groups`. Call it after the plan is
    applied (``MixedPrecision.setup(model)``) and before the optimizer is built, in every rank.

    Returns:
        The groups, root last (for ``describe``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    groups = plan_groups(model, resolved, reduce_dtype)
    with torch.no_grad():  # FSDP2 shards contiguous parameters only (not channels-last conv weights)
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for group, modules in groups:
        policy = MixedPrecisionPolicy(param_dtype=group.param_dtype, reduce_dtype=group.reduce_dtype,
                                      cast_forward_inputs=False)
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, mp_policy=policy)
    return [g for g, _ in groups]
