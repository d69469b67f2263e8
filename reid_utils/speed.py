"""Speed-only machinery, kept out of the tutorial loop: precision, the CPU's abilities, the allocator.

Nothing here changes *what* is trained, only how fast: the training loop in ``reid_utils.train`` reads
like the classic script, and these pieces wrap the model, the criterion and the optimiser around it.

* Mixed precision. ``torch.autocast`` runs matrix products and convolutions in a 16-bit type and keeps
  sums and the loss in float32. bfloat16 keeps float32's range and needs nothing else; float16 does not,
  so small gradients underflow to zero unless the loss is multiplied by a large factor before the
  backward pass and the gradients divided by it before the step ("loss scaling",
  ``torch.amp.GradScaler``). ``Autocast``, ``ScaledLoss`` and ``ScaledOptimizer`` add exactly that
  around an unchanged loop.
* The CPU: whether it computes bfloat16 natively (then bf16 autocast pays for large models).
* The allocator: keep freed memory in the process between training steps (``reuse_freed_memory``).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch
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


# torch 2.14's oneDNN bfloat16 convolutions compute garbage weight gradients (up to 1e32) for ResNet's stride-2
# convolution in layer4 when its input map is 2x1, i.e. for 32x16 images; 48x24 and larger train normally
# (checked on an AVX-512 BF16 CPU with plain torchvision models: 6 of 6 runs broke at 32x16, 0 of 6 at 48x24).
CPU_BF16_MIN_SIZE = (48, 24)


def choose_precision(
    device: torch.device, fp16: bool = False, bf16: bool = False, image_size: tuple[int, int] | None = None
) -> tuple[torch.dtype | None, str]:
    """The autocast type for this device (``None``: plain float32) and a notice when a request falls back.

    CUDA: bfloat16 with ``--bf16`` (float16 with loss scaling on GPUs without it), float16 with ``--fp16``.
    CPU: bfloat16 with ``--bf16`` on a CPU with native bfloat16, where it pays for large models (ResNet-50
    at 256x128 trained ~3x faster on our 2-core test machine; the small demo model gains nothing), for
    inputs of at least ``CPU_BF16_MIN_SIZE``; else float32, and float32 for ``--fp16`` (a GPU format).
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
        if image_size is not None and (image_size[0] < CPU_BF16_MIN_SIZE[0] or image_size[1] < CPU_BF16_MIN_SIZE[1]):
            low_h, low_w = CPU_BF16_MIN_SIZE
            return None, (
                f"bfloat16 on the CPU gives wrong gradients for images smaller than {low_h}x{low_w} (a bug of "
                f"torch's oneDNN kernels): training in float32 instead."
            )
        return torch.bfloat16, ""
    if fp16:
        return None, "float16 mixed precision is for GPUs: training in float32 on the CPU instead."
    return None, ""


class Autocast(nn.Module):
    """Run a module's forward pass under ``torch.autocast`` (wrap the model, and the criterion).

    The loop then calls ``model(inputs)`` as usual. Only the forward pass is autocast: the backward pass
    runs each operation in the type its forward pass used, as PyTorch recommends.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, self.dtype):
            return self.module(*args, **kwargs)


class ScaledLoss(nn.Module):
    """float16 loss scaling, first half: the loss's gradient is multiplied by the scaler's factor.

    A hook on the loss does what ``scaler.scale(loss).backward()`` does, so the loop still calls
    ``loss.backward()`` and still adds up the true (unscaled) ``loss.item()``.
    """

    def __init__(self, criterion: nn.Module, scaler: torch.amp.GradScaler) -> None:
        super().__init__()
        self.criterion = criterion
        self.scaler = scaler

    def forward(self, *args, **kwargs) -> torch.Tensor:
        loss = self.criterion(*args, **kwargs)
        if loss.requires_grad:
            loss.register_hook(self.scaler.scale)
        return loss


class ScaledOptimizer:
    """float16 loss scaling, second half: unscale the gradients, skip a step with inf/NaN, adapt the factor.

    ``optimizer.step()`` in the loop becomes ``scaler.step(optimizer); scaler.update()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer = optimizer
        self.scaler = scaler

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


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
