"""What the hardware can do, the mode ``auto`` picks from it, and a short measured micro-benchmark."""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vlamp.precision.dtypes import CANONICAL
from vlamp.precision.errors import VlampError


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The device training would run on.

    Attributes:
        device: ``"cuda"`` or ``"cpu"``.
        name: GPU name or CPU model.
        cuda_capability: ``(major, minor)`` for CUDA devices.
        cpu_flags: The CPU feature flags that matter for precision (``avx512_bf16``, ``amx_bf16``,
            ``avx512_fp16``, ``amx_fp16``, ``avx512f``, ``avx2``, ``f16c``).
    """

    device: str
    name: str
    cuda_capability: tuple[int, int] | None
    cpu_flags: tuple[str, ...]
    torch_version: str = torch.__version__

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Choice:
    mode: str
    reason: str


_INTERESTING = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16", "avx512f",
                "avx2", "f16c")


def _cpu_info() -> tuple[str, tuple[str, ...]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, tuple(f for f in _INTERESTING if f in flags)


DEVICE_NAMES = "auto, cpu, cuda, cuda:N"


def _parse_device(name: object) -> torch.device | None:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` as a device; ``None`` for ``auto``/empty. No check of
    what this machine has.

    Raises:
        VlampError: On any other name.
    """
    text = str(name if name is not None else "").strip().lower() or "auto"
    if text == "auto":
        return None
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise VlampError(f"device {name!r} is not one of {DEVICE_NAMES}")
    return dev


def check_device_name(name: str) -> None:
    """Checks the spelling of a device name (for configs read on one machine and run on another).

    Raises:
        VlampError: If it is not one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    """
    _parse_device(name)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a run trains on: ``"auto"`` (or ``None``/empty) is the first CUDA GPU when there
    is one, else the CPU; ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are taken as they are.

    Raises:
        VlampError: On another name, or a CUDA device this machine does not have (the message
            says how many it has).
    """
    dev = _parse_device(name)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise VlampError(f"device {name!r}: this machine has no CUDA device (torch "
                             f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}); "
                             f"use device=cpu or auto")
        if (dev.index or 0) >= count:
            raise VlampError(f"device {name!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def detect(device: str | torch.device | None = None) -> Hardware:
    """Describes ``device`` (default: the first CUDA GPU if there is one, else the CPU).

    Raises:
        VlampError: On a device name this machine does not have (see :func:`resolve_device`).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cpu_name, flags = _cpu_info()
    if dev.type == "cuda":
        idx = dev.index or 0
        return Hardware("cuda", torch.cuda.get_device_name(idx),
                        tuple(torch.cuda.get_device_capability(idx)), flags)
    return Hardware("cpu", cpu_name, None, flags)


def choose_mode(hw: Hardware) -> Choice:
    """The ``auto`` rule: CUDA >= 8.0 -> bf16-mixed; CUDA 7.x -> fp16-mixed; a CPU with AVX512-BF16
    or AMX -> bf16-mixed; anything else -> fp32. FP16 is never chosen on a CPU: without native FP16
    arithmetic it runs far slower than FP32."""
    if hw.device == "cuda" and hw.cuda_capability is not None:
        major, minor = hw.cuda_capability
        if major >= 8:
            return Choice("bf16-mixed", f"CUDA compute capability {major}.{minor} >= 8.0 has native "
                                        "BF16 tensor cores")
        if major == 7:
            return Choice("fp16-mixed", f"CUDA compute capability {major}.{minor} has FP16 tensor "
                                        "cores but no BF16; FP16 needs the dynamic loss scaler")
        return Choice("fp32", f"CUDA compute capability {major}.{minor} has no fast low precision")
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in hw.cpu_flags]
    if native:
        return Choice("bf16-mixed", f"CPU has {' and '.join(native)}: native BF16 matrix math")
    return Choice("fp32", "CPU without AVX512-BF16 or AMX: low precision would only be emulated")


def set_tf32(enabled: bool) -> None:
    """Lets (or forbids) CUDA FP32 matmuls and cuDNN convolutions use TF32, for the process.
    Uses torch's ``fp32_precision`` switches (torch >= 2.9), else the older ``allow_tf32`` flags;
    torch refuses a mix of the two, so nothing else here touches TF32."""
    value = "tf32" if enabled else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def synchronize(device: torch.device | str) -> None:
    """Waits for the work queued on ``device`` (a GPU runs asynchronously; a timer must wait)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tf32_enabled() -> bool:
    """Whether CUDA FP32 matmuls may use TF32 now (read through the same switches as
    :func:`set_tf32`)."""
    try:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:
        return bool(torch.backends.cuda.matmul.allow_tf32)


def _time(fn: Callable[[], object], budget_s: float, device: torch.device) -> float:
    fn()  # warm-up
    synchronize(device)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / n


THROUGHPUT_KINDS = ("gemm", "conv", "attention")


def measure_throughput(device: str = "cpu", budget_s: float = 0.15,
                       kinds: Sequence[str] = THROUGHPUT_KINDS) -> dict[str, dict[str, float]]:
    """Measures throughput (GFLOP/s) in fp32, bf16 and fp16 on ``device`` (and FP32 on TF32
    tensor cores, ``tf32``, on CUDA; FP32 itself runs as IEEE FP32 there): a GEMM, a 3x3 conv, and
    scaled dot-product attention forward and backward (the kernel whose bf16 backward is several
    times slower than FP32's on some CPUs, so a bf16 plan keeps it FP32 there).

    Small problems, ``budget_s`` seconds each: a sanity check of what a precision buys here, not a
    full benchmark. Returns ``{"gemm": {"fp32": ..., ...}, "conv": {...}, "attention": {...}}``,
    the ``kinds`` asked for.
    """
    unknown = [k for k in kinds if k not in THROUGHPUT_KINDS]
    if unknown:
        raise VlampError(f"measure_throughput: unknown kind(s) {', '.join(unknown)}; legal: "
                         f"{', '.join(THROUGHPUT_KINDS)}")
    dev = torch.device(device)
    big = dev.type == "cuda"
    n = 4096 if big else 512
    b, c, hw = (64, 128, 64) if big else (8, 64, 32)
    nb, heads, t, d = (16, 16, 1024, 64) if big else (64, 4, 96, 32)  # CPU: the mt10 recipe's
    out: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    gen = torch.Generator(device="cpu").manual_seed(0)
    before = tf32_enabled()
    set_tf32(False)
    try:
        for name, dtype in CANONICAL.items():
            def randn(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(dev, dtype)

            work = {}  # kind -> (flops, the work), made only for the kinds asked for
            if "gemm" in kinds:
                a, w = randn(n, n), randn(n, n)
                work["gemm"] = (2 * n**3, lambda a=a, w=w: a @ w)
            if "conv" in kinds:
                x, k = randn(b, c, hw, hw), randn(c, c, 3, 3)
                work["conv"] = (2 * b * c * c * 9 * hw * hw,
                                lambda x=x, k=k: F.conv2d(x, k, padding=1))
            if "attention" in kinds:  # QK^T and PV forward, four such products backward
                qkv = [randn(nb, heads, t, d).requires_grad_() for _ in range(3)]
                work["attention"] = (6 * 2 * nb * heads * t * t * d,
                                     lambda qkv=qkv: torch.autograd.grad(
                                         F.scaled_dot_product_attention(*qkv).sum(), qkv))
            tf32 = ["tf32"] if dev.type == "cuda" and dtype == torch.float32 else []
            for kind in [name, *tf32]:
                set_tf32(kind == "tf32")  # tf32: FP32 tensors on TF32 tensor cores, what it buys
                for what in kinds:
                    flops, fn = work[what]
                    out[what][kind] = flops / _time(fn, budget_s, dev) / 1e9
    finally:
        set_tf32(before)
    return out


def native_formats(hw: Hardware) -> tuple[str, ...]:
    """The low-precision formats ``hw`` computes natively (``"bf16"``, ``"fp16"``); the others are
    emulated there, far slower than FP32."""
    if hw.device == "cuda" and hw.cuda_capability is not None:
        major = hw.cuda_capability[0]
        return ("bf16", "fp16") if major >= 8 else ("fp16",) if major == 7 else ()
    out = []
    if {"avx512_bf16", "amx_bf16"} & set(hw.cpu_flags):
        out.append("bf16")
    if {"avx512_fp16", "amx_fp16"} & set(hw.cpu_flags):
        out.append("fp16")
    return tuple(out)
