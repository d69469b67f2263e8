"""Speed-only machinery, kept out of the tutorial loop: which precision, the CPU's abilities, the allocator.

Nothing here changes *what* is trained, only how fast. The loop itself (``reid_utils.train.train_one_phase``)
writes mixed precision as layumi's and nanoGPT's loops do: an autocast context around the forward pass and
the loss, and a ``torch.amp.GradScaler`` that is switched on for float16 only. Here is what decides it:

* Mixed precision. ``torch.autocast`` runs matrix products and convolutions in a 16-bit type and keeps
  sums and the loss in float32. bfloat16 keeps float32's range and needs nothing else; float16 does not,
  so small gradients underflow to zero unless the loss is multiplied by a large factor before the
  backward pass and the gradients divided by it before the step ("loss scaling", the ``GradScaler``).
  ``choose_precision`` picks the type for the device and the request.
* The CPU: whether it computes bfloat16 natively (then bf16 autocast pays for large models), and whether
  its bfloat16 kernels compute what float32 does (``bf16_step_error``, ``float32_on_tiny_maps``).
* The allocator: keep freed memory in the process between training steps (``reuse_freed_memory``).
"""

from __future__ import annotations

import copy
import ctypes
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or ``None`` where that file does not exist."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), so that bf16 autocast pays there.

    oneDNN's own query also says yes on AVX-512 CPUs without these instructions, where bfloat16 is emulated
    and slower than float32; so on Linux the CPU's flags decide.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without this query: assume not, train in float32
        return False


def needs_float32(conv: nn.Conv2d, size: tuple[int, int]) -> bool:
    """Whether oneDNN's bfloat16 weight gradient is unsafe for a convolution on an input map this size.

    It is where the output is a single row or column, or where one of the kernel's rows or columns sees only
    padding at every output position (its true gradient is exactly zero). On an AVX-512 BF16 CPU (torch
    2.14, oneDNN 3.12) every stride-2 3x3 convolution with a one-pixel-wide input gave NaN, infinity or values
    up to 1e26 for its weight gradient in most tries (ResNet's ``layer4`` at 32x16 images); on AMX CPUs the
    smoke run at 48x24, where ``layer4``'s output is one pixel wide, ends in NaN, while 128x64 trains
    (``benchmarks/RESULTS.md``).
    """
    for side, kernel, stride, padding, dilation in zip(size, conv.kernel_size, conv.stride, conv.padding,
                                                       conv.dilation, strict=True):  # fmt: skip
        outputs = range((side + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1)
        if len(outputs) <= 1:
            return True
        for tap in range(kernel):
            if all(not 0 <= o * stride - padding + tap * dilation < side for o in outputs):
                return True
    return False


def float32_on_tiny_maps(model: nn.Module) -> nn.Module:
    """Make every convolution of ``model`` that ``needs_float32`` run in float32 under CPU bfloat16 autocast.

    A forward hook on each convolution (``_conv_in_float32``); elsewhere, and without CPU autocast, nothing
    changes. Training calls it when it trains in bfloat16 on a CPU; returns ``model``.
    """
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_hook(_conv_in_float32)
    return model


def _conv_in_float32(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: under CPU autocast, compute a convolution that ``needs_float32`` in float32 instead.

    Its bfloat16 result is dropped, so the backward pass never runs oneDNN's bfloat16 weight gradient for
    it. These convolutions work on maps of a pixel or two: float32 there costs nothing.
    """
    inputs = args[0]
    if not torch.is_autocast_enabled("cpu") or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if not needs_float32(conv, tuple(inputs.shape[-2:])):
        return None
    with torch.autocast("cpu", enabled=False):
        return F.conv2d(inputs.float(), conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def choose_precision(
    device: torch.device,
    fp16: bool = False,
    bf16: bool = False,
    model: nn.Module | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[torch.dtype | None, str]:
    """The autocast type for this device (``None``: plain float32) and a notice when a request falls back.

    CUDA: bfloat16 with ``--bf16`` (float16 with loss scaling on GPUs without it), float16 with ``--fp16``.
    CPU: bfloat16 with ``--bf16`` on a CPU with native bfloat16, where it pays for large models (ResNet-50
    at 256x128 trained ~3x faster on our 2-core test machine; the small demo model gains nothing), and where
    one bfloat16 training step of ``model`` at ``image_size`` computes what float32 does (``bf16_step_error``);
    else float32, and float32 for ``--fp16`` (a GPU format).
    """
    if device.type == "cuda":
        if bf16 and not torch.cuda.is_bf16_supported():
            return torch.float16, "This GPU has no bfloat16: mixed precision uses float16 with loss scaling instead."
        if bf16:
            return torch.bfloat16, ""
        return (torch.float16 if fp16 else None), ""
    if bf16:
        if not cpu_has_bf16():
            return None, "This CPU has no native bfloat16 (AVX-512 BF16 or AMX): training in float32 instead."
        if model is not None and image_size is not None:
            error = bf16_step_error(model, image_size)
            if not error <= BF16_STEP_TOLERANCE:
                return None, (
                    f"bfloat16 on this CPU does not compute what float32 does (a test step's gradients were up to "
                    f"{error:.3g}x off, allowed {BF16_STEP_TOLERANCE:g}x): training in float32 instead."
                )
        return torch.bfloat16, ""
    if fp16:
        return None, "float16 mixed precision is for GPUs: training in float32 on the CPU instead."
    return None, ""


# How much larger or smaller one bfloat16 step's gradient of a parameter may be than float32's
# (``bf16_step_error``). Rounding moved it by at most 1.39x (randomly initialised ResNet-18/34/50 with either
# head and last stride, 32x16 to 256x128, 37 cases; ``benchmarks/RESULTS.md``); the broken convolutions that
# ``needs_float32`` routes around gave 1e9x and more, or NaN.
BF16_STEP_TOLERANCE = 4.0


def bf16_step_error(model: nn.Module, image_size: tuple[int, int], batch: int = 8) -> float:
    """How far one bfloat16 training step on this CPU lands from float32's: the largest factor by which a
    parameter's gradient is larger or smaller (1.0: the same size everywhere; ``inf`` for NaN or infinity).

    A copy of ``model`` (the run's own weights, running statistics and random numbers stay as they are) takes
    one step on ``batch`` random images of ``image_size``, once in float32 and once under bfloat16 autocast
    as training does: about the time of one bfloat16 training step at batch 32. Sizes, not directions: in a
    randomly initialised ResNet, float32 itself, with its weights rounded to bfloat16's precision, gives
    gradients pointing elsewhere but of the same size, while a broken kernel gives sizes far off. Norms below
    1e-3 of the largest are lifted to that floor (the bias before a BatchNorm has a gradient of next to
    nothing, and rounding noise larger than that). 8 images, not 4: with 4, BatchNorm's statistics are so
    noisy that rounding alone moved a gradient 4x. A kernel that reads memory it did not write (the one
    ``needs_float32`` avoids) can be right in this step and wrong later: the check is a guard, not a proof.
    """
    probe = float32_on_tiny_maps(copy.deepcopy(model).train())
    images = torch.randn(batch, 3, *image_size, generator=torch.Generator().manual_seed(0))
    if any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
           for p in probe.parameters()):  # fmt: skip
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[]):  # the same dropout both times; the run's generator untouched
        exact = [g.norm().item() for g in _gradients(probe, images)]
        rounded = [g.norm().item() for g in _gradients(probe, images, torch.bfloat16)]
    floor = 1e-3 * max(exact)
    factors = [(b + floor) / (a + floor) for a, b in zip(exact, rounded, strict=True)]
    worst = max(max(f, 1 / f) if f > 0 else math.inf for f in factors)
    return worst if math.isfinite(worst) else math.inf


def _gradients(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Every parameter's gradient of the cross-entropy of one batch, labels 0, 1, 2, ... (dropout seeded), with
    the forward pass autocast to ``dtype`` (``None``: float32)."""
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype, enabled=dtype is not None):
        outputs = model(images)
    logits = (outputs[0] if isinstance(outputs, tuple) else outputs).float()  # a triplet run's: (scores, features)
    labels = torch.arange(len(images)) % logits.shape[1]
    F.cross_entropy(logits, labels).backward()
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]


def reuse_freed_memory() -> bool:
    """Make this process keep the memory it frees for reuse, instead of handing it back to the OS at every step.

    A CPU training step allocates and frees the same large blocks each time (activations, gradients: tens of
    MB). glibc gives big freed blocks back to the operating system, which then has to map in and zero fresh
    pages on the next step. Raising glibc's two thresholds (``mallopt``) keeps them in the process: about 7 %
    faster training of the demo model on our 2-core machine, the very same numbers. The price: the process
    holds on to its peak memory until it ends. ``--fast_data`` on a CPU switches it on. Linux with glibc only;
    returns whether it took effect. (Starting Python with jemalloc or tcmalloc preloaded does the same.)
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (e.g. musl): leave it alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
