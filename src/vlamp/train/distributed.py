"""Data-parallel (DDP) and sharded (FSDP2) training on torchrun: the process group, each rank's
share of a batch, the wrapping driven by the precision plan, and gathered checkpoints.

``torchrun --nproc-per-node N -m vlamp train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init` joins them (gloo on CPUs, NCCL on GPUs, one
GPU per local rank). Without those variables everything here is a no-op for one process.

Batches: every rank draws the same *global* sample positions from the same seeded stream and takes
its own slice, so N ranks with ``batch_size`` B read exactly the samples one process with N x B
reads, and their averaged gradients are the same step.

Checkpoints are gathered, not sharded: each tensor is assembled in full (one collective per
sharded tensor) and rank 0 writes the same safetensors files a single process writes. Chosen
because ``torch.distributed.checkpoint`` unpickles its ``.metadata`` file when loading (vlamp has
no pickle on any load path) and, for the model sizes trained here (2-380 M parameters), one
gathered file is small. A gathered checkpoint resumes at any world size, and ``vlamp eval`` reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vlamp.precision.dtypes import dtype_name, to_dtype
from vlamp.precision.errors import VlampError
from vlamp.precision.hardware import resolve_device
from vlamp.precision.mixed_precision import MixedPrecision

STRATEGIES = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run.

    Attributes:
        rank: This process's rank (0 writes logs and checkpoints).
        size: Number of ranks (1: not distributed).
        local_rank: Rank on this machine (the GPU it uses).
        backend: ``"gloo"``, ``"nccl"`` or ``""`` for one process.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: str) -> tuple[World, torch.device]:
    """Joins the torchrun process group when launched by torchrun; picks this rank's device.

    Args:
        device: ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); under torchrun a CUDA
            run uses GPU ``LOCAL_RANK``.

    Raises:
        VlampError: If more ranks than GPUs share a machine.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(device)
    if size <= 1:
        return World(), chosen
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        if local >= torch.cuda.device_count():
            raise VlampError(f"torchrun local rank {local} has no GPU ({torch.cuda.device_count()} "
                             f"here); use --nproc-per-node <= {torch.cuda.device_count()} or "
                             f"train.device=cpu")
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Rank 0 may evaluate in the simulator for minutes while the others wait at a barrier.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60),
                                device_id=chosen if chosen.type == "cuda" else None)
    return World(rank, size, local, backend), chosen


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def my_share(positions: np.ndarray, micro_batches: int, world: World) -> list[np.ndarray]:
    """This rank's positions of each micro-batch, out of a global draw of
    ``micro_batches x world.size x batch`` positions (micro-batch major, then rank)."""
    return list(positions.reshape(micro_batches, world.size, -1)[:, world.rank])


def loss_shares(masks: list[torch.Tensor], world: World) -> list[float] | None:
    """Factors that turn each rank's masked-mean loss into its share of the mean over all ranks'
    samples (``None`` for one process).

    A rank's loss is a mean over its own valid (unpadded) action steps, and DDP/FSDP average the
    ranks' gradients; when ranks hold different numbers of valid steps that weighs a step by the
    rank it landed on. Multiplying rank r's loss by ``n_r * N / sum(n)`` (n: valid steps) makes the
    average exactly the mean over every valid step, as one process with the whole batch computes.

    Args:
        masks: This rank's ``action_mask`` of each micro-batch.
    """
    if not world.distributed:
        return None
    counts = torch.stack([m.sum() for m in masks]).double()
    total = counts.clone()
    dist.all_reduce(total)
    return (counts * world.size / total.clamp(min=1)).tolist()


@contextlib.contextmanager
def own_noise(world: World, seed: int, step: int, device: torch.device) -> Iterator[None]:
    """Inside, each rank draws from a random stream of its own (seeded by seed, step and rank),
    and the shared stream is left as it was: the global draws (sample positions, augmentation)
    stay the same on every rank, while noise drawn in the forward pass (the flow head's time and
    noise samples) differs between ranks as it does between the samples of one process. One
    process: the shared stream, untouched."""
    if not world.distributed:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(hash((seed, step, world.rank)) & 0xFFFF_FFFF)
        yield


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself for one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, the forward and backward inside skip the gradient all-reduce (DDP's
    ``no_sync``) or reduce-scatter (FSDP2): the non-final micro-batches of an accumulated step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    shardable = hasattr(model, "set_requires_gradient_sync")
    if shardable:
        model.set_requires_gradient_sync(enabled)
    yield


def broadcast_json(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` (JSON-serialisable) on every rank: sent as JSON bytes, not pickled."""
    if not world.distributed:
        return obj
    device = torch.device("cuda", world.local_rank) if world.backend == "nccl" else torch.device("cpu")
    data = json.dumps(obj).encode() if world.main else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if world.main:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def wrap(model: nn.Module, mp: MixedPrecision, strategy: str, reduce_dtype: str,
         world: World) -> nn.Module:
    """Wraps a model whose plan ``mp.setup(model)`` applied, for ``world``: DDP (the returned
    wrapper runs forward and all-reduces gradients) or FSDP2 (``model`` is sharded in place and
    returned). One process: the model itself. Build the optimizer afterwards, over
    ``model.parameters()``, and hand it to ``mp.setup(model, optimizer)``.

    Args:
        strategy: ``ddp`` or ``fsdp``.
        reduce_dtype: Dtype gradients travel in: ``fp32`` (default), or ``bf16``/``fp16`` (half
            the traffic; DDP compresses with a communication hook, FSDP2 reduce-scatters in it).

    Raises:
        VlampError: On an unknown strategy, or a ``-true`` mode (its FP32 masters live outside the
            wrapper: use the ``-mixed`` mode, which under FSDP2 stores FP32 shards and gathers
            low precision).
    """
    if strategy not in STRATEGIES:
        raise VlampError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    reduce = to_dtype(reduce_dtype, what="distributed.reduce_dtype")
    if not world.distributed:
        return model
    if mp.low_precision_storage:
        low = mp.mode.name.replace("-true", "-mixed")
        raise VlampError(f"precision.mode={mp.mode.name} stores weights in low precision "
                         f"({mp.low_precision_storage[0]}, ...) with FP32 masters outside DDP/FSDP's "
                         f"gradient reduction: not supported under torchrun yet. Use "
                         f"precision.mode={low} (with distributed.strategy=fsdp each rank stores "
                         f"FP32 shards only and gathers {low.split('-')[0]} for compute)")
    if strategy == "ddp":
        device_ids = [world.local_rank] if world.backend == "nccl" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if reduce != torch.float32:
            wrapped.register_comm_hook(reduce, _compress_hook)
        mp.parallel_notes = [f"DDP over {world.size} ranks ({world.backend}): every rank holds the "
                             f"whole model; gradients all-reduced in {dtype_name(reduce)}"]
        return wrapped
    from torch.distributed.fsdp import register_fsdp_forward_method

    mp.shard(reduce)
    # TinyVLA's blocks return views (reshapes) and nothing modifies them in place; the tests check
    # FSDP2's losses against one process's, so this per-module warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if hasattr(model, "predict"):  # validation calls it: it must gather the root's shards too
        register_fsdp_forward_method(model, "predict")
    mp.parallel_notes[0] = f"FSDP2 over {world.size} ranks ({world.backend}); " + mp.parallel_notes[0]
    return model


def _compress_hook(dtype, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP's gradient all-reduce in ``dtype``: each bucket (a ``dist.GradBucket``) is cast down,
    summed across ranks, divided by the rank count and cast back; returns a future of the bucket.
    (torch's own bf16 hook asks for NCCL; this one runs on gloo too.)"""
    group = dist.group.WORLD
    world = dist.get_world_size(group)
    grads = bucket.buffer()
    low = grads.to(dtype).div_(world)

    def back(fut: torch.futures.Future) -> torch.Tensor:
        grads.copy_(fut.value()[0])
        return grads

    return dist.all_reduce(low, group=group, async_op=True).get_future().then(back)


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def gather(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each sharded tensor (FSDP2 DTensor) assembled in full, on every rank; others as they are.
    Every rank must call it with the same keys: one collective per sharded tensor, in sorted key
    order (a dict's order can differ between ranks: safetensors loads in hash order)."""
    return {k: _full(tensors[k]) for k in sorted(tensors)}


def shard_like(full: dict[str, torch.Tensor], like: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full tensors (from a checkpoint) cut to this rank's shards where ``like`` holds sharded
    tensors of the same name (no communication: every rank has the full tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for k, v in full.items():
        ref = like.get(k)
        if isinstance(ref, DTensor) and not isinstance(v, DTensor):
            v = distribute_tensor(v.to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                                  src_data_rank=None)
        out[k] = v
    return out


@torch.no_grad()
def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of full tensors: cuts each state tensor of a sharded
    parameter to the parameter's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, st in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
