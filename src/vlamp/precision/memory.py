"""What training holds in memory, by kind, and activation checkpointing by rule.

* :func:`state_memory`: bytes of parameters, FP32 masters, gradients, optimizer state and Kahan
  compensation buffers, counted from the tensors themselves.
* :class:`ActivationMeter`: bytes the forward pass saves for the backward, per module, measured
  with autograd's saved-tensor hooks (each storage counted once, parameters not counted).
* :func:`step_memory`: the live tensor memory over one training step, by kind, from PyTorch's
  profiler (what the step needs, whatever the allocator keeps besides).
* :class:`PeakRSS`, :func:`available_memory`: a process's measured peak, and what a run may use.
* :func:`checkpoint_modules`: the modules a rule names recompute their forward in the backward
  instead of saving their activations (``torch.utils.checkpoint``, non-reentrant).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlamp.precision.errors import VlampError
from vlamp.precision.verify import track_modules

_CHECKPOINTED = "_vlamp_checkpointed"


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard
    return local.numel() * local.element_size()


def state_memory(model: nn.Module, optimizer: torch.optim.Optimizer, mp: Any = None) -> dict[str, int]:
    """Bytes this process holds for training besides activations (under FSDP2: its shards).

    Gradients are counted as one per parameter the optimizer updates, in that parameter's dtype
    (what a step holds), whether or not they exist at the moment of the call.

    Args:
        model: The model.
        optimizer: Its optimizer (after ``mp.setup``: it may hold FP32 masters instead of the
            model's low-precision parameters).
        mp: The :class:`~vlamp.precision.mixed_precision.MixedPrecision` object, for the Kahan buffers.

    Returns:
        ``params_bytes``, ``masters_bytes``, ``grads_bytes``, ``optimizer_bytes``,
        ``compensation_bytes`` and their sum ``state_bytes``.
    """
    model_ids = {id(p) for p in model.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {
        "params_bytes": sum(_bytes(p) for p in model.parameters()),
        "masters_bytes": sum(_bytes(p) for p in opt_params if id(p) not in model_ids),
        "grads_bytes": sum(_bytes(p) for p in opt_params if p.requires_grad),
        "optimizer_bytes": sum(_bytes(t) for st in optimizer.state.values()
                               for t in st.values() if isinstance(t, torch.Tensor)),
        "compensation_bytes": 0,
    }
    weights = getattr(mp, "weights", None)
    if weights is not None:
        held = weights.state_bytes()
        out["compensation_bytes"] = held.get("compensation", 0)
        out["optimizer_bytes"] += held.get("optimizer", 0)  # 8-bit moments live with the update
    out["state_bytes"] = sum(out.values())
    return out


class ActivationMeter:
    """Measures what a forward pass saves for the backward, per module.

    Each tensor autograd saves is attributed to the innermost module whose forward is running;
    a storage saved several times (an input read by two ops) counts once, and parameters (which
    live anyway) not at all. Low-precision copies of FP32 weights made by autocast do count: they
    live until the backward like activations.

    Example:
        >>> with ActivationMeter(model) as meter:        # doctest: +SKIP
        ...     loss = model(batch)
        >>> meter.total, meter.by_module["trunk"]        # doctest: +SKIP

    Attributes:
        by_module: Module name -> bytes saved while it was the innermost running module
            (``"(root)"`` for the model itself).
        total: All bytes saved.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.by_module: dict[str, int] = {}
        self.by_dtype: dict[str, int] = {}
        self._stack: list[str] = []
        self._seen: set[tuple[int, int]] = set()
        self._params = {key[0] for p in model.parameters() if (key := _storage(p)) is not None}
        self._handles: list[Any] = []
        self._hooks: Any = None

    @property
    def total(self) -> int:
        return sum(self.by_module.values())

    def subtree(self, prefix: str) -> int:
        """Bytes saved in ``prefix`` and every module below it."""
        return sum(v for k, v in self.by_module.items() if k == prefix or k.startswith(prefix + "."))

    def __enter__(self) -> ActivationMeter:
        self._handles = track_modules(self.model, self._stack, root="(root)")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key is None or key[0] in self._params or key in self._seen:
            return t
        self._seen.add(key)
        where = self._stack[-1] if self._stack else "(root)"
        self.by_module[where] = self.by_module.get(where, 0) + key[1]
        dtype = str(t.dtype).removeprefix("torch.")
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + key[1]
        return t


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """``(address, bytes)`` of a tensor's storage (a DTensor's local shard); ``None`` for tensors
    without one (sparse, fake, a sharded parameter's unsharded wrapper)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    try:
        storage = local.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


class PeakRSS:
    """The peak of this process's resident memory above a baseline (Linux: ``VmHWM``, reset
    through ``/proc/self/clear_refs``); on CUDA, ``torch.cuda.max_memory_allocated`` above the
    allocated bytes at the reset.

    Example:
        >>> peak = PeakRSS()              # the baseline is now   # doctest: +SKIP
        >>> train(); peak.read()          # bytes above it        # doctest: +SKIP
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.baseline = 0
        _warm_up(torch.device(device))
        self.reset()

    def reset(self) -> None:
        """Starts a new measurement from the memory held now."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # not Linux, or not allowed: the lifetime peak is read instead
        self.baseline = _status_bytes("VmRSS")

    def read(self) -> int:
        """Bytes of the peak since :meth:`reset`, above what was held then (0 if unknown)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated() - self.baseline)
        return max(0, _status_bytes("VmHWM") - self.baseline)


def _warm_up(device: torch.device) -> None:
    """A tiny forward, backward and fused AdamW step, so the runtime's one-time allocations
    (thread pools, kernel caches, the autograd engine) are made before a baseline is taken:
    what is measured after it is the run's own, in any process."""
    layer = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4)).to(device)
    x = torch.rand(2, 3, 8, 8, device=device)
    layer(x).sum().backward()
    torch.optim.AdamW(layer.parameters(), fused=True).step()


def _status_bytes(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, where: str = "train.memory_budget") -> int:
    """``"24GiB"``, ``"500 MB"``, ``"2e9"`` -> bytes.

    Raises:
        VlampError: Naming ``where`` and the legal forms.
    """
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    try:
        value = float(m.group(1)) if m else -1.0
    except ValueError:
        value = -1.0
    if not m or unit not in UNITS or value <= 0:
        raise VlampError(f"{where}: {text!r} is not a size; use a number with a unit "
                         f"({', '.join(u for u in UNITS if u)}), e.g. 24GiB, or auto")
    return int(value * UNITS[unit])


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a new training run may use here: the GPU's free memory, or the memory Linux
    reports available (``MemAvailable``), capped by this process's cgroup limit."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                free = min(free, int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    return free


# The columns of torch.profiler's memory timeline, after its leading one.
TIMELINE_KINDS = ("parameters", "optimizer_state", "inputs", "temporaries", "activations",
                  "gradients", "autograd", "unknown")


def step_memory(run: Callable[[], object], device: str = "cpu") -> dict[str, Any] | None:
    """The live tensor memory over one call of ``run`` (a training step), from PyTorch's profiler:
    ``peak_bytes`` (all live tensors at the step's peak, allocator caching not counted),
    ``peak_by_kind`` (bytes per kind at that moment: parameters, optimizer state, inputs,
    activations, gradients, ...) and ``added_bytes`` (the peak minus what lived before the step).
    ``None`` when the profiler cannot tell (an older torch, an unsupported device)."""
    import json
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_stderr():
            warnings.simplefilter("ignore")
            with profile(activities=activities, profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                run()
            path = f"{tmp}/timeline.json"
            prof.export_memory_timeline(path, device=device)
            with open(path) as f:
                _, sizes = json.load(f)
    except Exception:  # the profiler's memory timeline is best effort; say nothing was measured
        return None
    if not sizes:
        return None
    totals = [sum(row[1:]) for row in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    return {"peak_bytes": int(totals[peak]), "added_bytes": int(totals[peak] - totals[0]),
            "peak_by_kind": dict(zip(TIMELINE_KINDS, map(int, sizes[peak][1:])))}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints stage lines to file descriptor 2; they say nothing a user
    needs, so they go to /dev/null while it runs."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or any(
        fnmatch.fnmatchcase(cls.__name__, pattern) for cls in type(module).__mro__
        if cls not in (nn.Module, object))


def checkpoint_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Makes the modules ``patterns`` name recompute their forward during the backward instead of
    saving its activations (``torch.utils.checkpoint.checkpoint``, non-reentrant: the autocast
    state and the RNG of the first forward are replayed, so the recomputed values are the same).

    A pattern globs a qualified name (``trunk.*``) or a class name (``TransformerBlock``), as
    precision rules do. A module inside one already checkpointed is not wrapped again. Apply it
    after :meth:`MixedPrecision.setup` so the recomputation includes the precision boundaries.

    Returns:
        The names of the checkpointed modules.

    Raises:
        ValueError: If a pattern matches no module (the legal names are the model's).
    """
    chosen: list[str] = []
    for pattern in patterns:
        if not any(_matches(pattern, n, m) for n, m in model.named_modules() if n):
            raise ValueError(f"{pattern!r} matches no module of "
                             f"{type(model).__name__}; names look like "
                             f"{', '.join(n for n, _ in list(model.named_children())[:4])}")
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        if any(_matches(p, name, module) for p in patterns) and not getattr(module, _CHECKPOINTED, False):
            _wrap(module)
            chosen.append(name)
    return chosen


def _wrap(module: nn.Module) -> None:
    forward = type(module).forward  # the class's (a precision boundary's, after setup)

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(module, *args, **kwargs)
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
    setattr(module, _CHECKPOINTED, True)
