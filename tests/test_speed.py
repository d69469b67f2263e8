"""Speed-only machinery: precision choices, the CPU's bfloat16, float16 loss scaling around the loop, the allocator."""

import ctypes
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import reid_utils.speed as speed_module
from reid_utils.model import build_model
from reid_utils.speed import (
    BF16_STEP_TOLERANCE,
    bf16_step_error,
    choose_precision,
    float32_on_tiny_maps,
    needs_float32,
)
from reid_utils.train import train_one_phase


def test_cpu_bf16_is_decided_by_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(speed_module, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl"})  # Skylake-SP
    assert speed_module.cpu_has_bf16() is False  # AVX-512 alone: bfloat16 would be emulated, slower than float32
    monkeypatch.setattr(speed_module, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # Zen 4, Cooper Lake
    assert speed_module.cpu_has_bf16() is True
    monkeypatch.setattr(speed_module, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})  # Sapphire Rapids
    assert speed_module.cpu_has_bf16() is True
    monkeypatch.undo()
    assert "fpu" in (speed_module.cpu_flags() or {"fpu"})  # this Linux machine's real flags are read


def test_precision_choices_and_their_notices(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(speed_module, "cpu_has_bf16", lambda: False)
    dtype, notice = choose_precision(cpu, bf16=True)
    assert dtype is None and "no native bfloat16" in notice and "float32" in notice
    dtype, notice = choose_precision(cpu, fp16=True)
    assert dtype is None and "float32" in notice  # float16 is a GPU format
    monkeypatch.setattr(speed_module, "cpu_has_bf16", lambda: True)
    assert choose_precision(cpu) == (None, "")  # the CPU autocasts only when asked to
    assert choose_precision(cpu, bf16=True) == (torch.bfloat16, "")
    # CUDA: only the device's answer is mocked, nothing runs on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    dtype, notice = choose_precision(cuda, bf16=True)
    assert dtype == torch.float16 and "float16 with loss scaling" in notice
    assert choose_precision(cuda) == (None, "")  # float32, as the classic script, unless asked
    assert choose_precision(cuda, fp16=True) == (torch.float16, "")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_precision(cuda, bf16=True) == (torch.bfloat16, "")


def _reid_net(backbone: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    options = SimpleNamespace(num_classes=8, backbone=backbone, droprate=0.5, stride=2, linear_num=512, bnneck=False)
    return build_model(options)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size", "expected"),
    [
        (3, 2, 1, (2, 1), True),  # ResNet-18's layer4 at 32x16 images: a 1-pixel-wide input
        (3, 2, 1, (3, 2), True),  # ... at 48x24: the output is one pixel wide (the AMX NaN)
        (1, 2, 0, (3, 2), True),  # the shortcut's 1x1 convolution beside it: its output too
        (3, 1, 1, (2, 1), True),  # stride 1 on a 1-pixel-wide map: the outer columns see only padding
        (3, 2, 1, (8, 4), False),  # 128x64 images: every tap sees pixels
        (3, 1, 1, (4, 2), False),
        (7, 2, 3, (32, 16), False),  # the first convolution
    ],
)
def test_which_convolutions_run_in_float32(kernel, stride, padding, size, expected):
    conv = nn.Conv2d(4, 4, kernel, stride, padding)
    assert needs_float32(conv, size) is expected


@pytest.mark.parametrize(("channels", "height", "batch"), [(64, 2, 8), (256, 2, 16)])
def test_a_strided_convolution_on_a_one_pixel_wide_map_gets_its_float32_weight_gradient(channels, height, batch):
    """The mechanism: oneDNN's bfloat16 weight gradient of such a convolution read memory it had not written
    on our AVX-512 BF16 CPU: NaN, infinity or up to 1e12 in most of these tries (right in some, depending on
    what the memory held). With ``float32_on_tiny_maps`` it is computed in float32 under autocast, right every time."""
    for seed in range(4):
        torch.manual_seed(seed)
        conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        inputs = torch.randn(batch, channels, height, 1).bfloat16().float()
        conv(inputs).square().sum().backward()
        exact, conv.weight.grad = conv.weight.grad, None
        with torch.autocast("cpu", torch.bfloat16):
            output = float32_on_tiny_maps(conv)(inputs)
        output.float().square().sum().backward()
        assert (conv.weight.grad - exact).norm() <= 0.05 * exact.norm(), seed  # False for NaN


def test_the_float32_convolutions_cost_no_precision_elsewhere():
    """Where every tap sees pixels the convolution stays in bfloat16 (the speed)."""
    conv = float32_on_tiny_maps(nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with torch.autocast("cpu", torch.bfloat16):
        assert conv(torch.randn(2, 8, 8, 4)).dtype == torch.bfloat16
        assert conv(torch.randn(2, 8, 2, 1)).dtype == torch.float32
    assert conv(torch.randn(2, 8, 8, 4)).dtype == torch.float32  # without autocast: float32 as ever


def test_a_bf16_step_follows_float32_on_this_cpu():
    """ResNet-18 at 32x16, where layer4's maps are one pixel wide: before the float32 convolutions, one step's
    gradients were 1e9x off here (NaN on other runs); after, as close as at sizes that always worked. (The
    native kernels here; the others in the test below.)"""
    model = _reid_net()
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    assert bf16_step_error(model, (32, 16)) <= BF16_STEP_TOLERANCE
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # a copy took the step
    assert all(p.grad is None for p in model.parameters()) and torch.equal(state, torch.get_rng_state())


class _WrongUnderAutocast(nn.Module):
    """A stand-in for a broken bfloat16 kernel: under CPU autocast the gradient that passes through it back to
    the layers before it is ``factor`` times too large (its output stays right)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor - x.detach() * (self.factor - 1) if torch.is_autocast_enabled("cpu") else x


@pytest.mark.parametrize("factor", [100.0, float("nan")])
def test_bf16_is_refused_in_one_line_where_a_step_disagrees_with_float32(monkeypatch, factor):
    monkeypatch.setattr(speed_module, "cpu_has_bf16", lambda: True)
    model = _reid_net()
    model.backbone.insert(5, _WrongUnderAutocast(factor))  # after layer1: the gradients of the first layers
    error = bf16_step_error(model, (32, 16))
    assert error > 10 * BF16_STEP_TOLERANCE
    assert math.isinf(error) == math.isnan(factor)
    dtype, notice = choose_precision(torch.device("cpu"), bf16=True, model=model, image_size=(32, 16))
    assert dtype is None and "\n" not in notice
    assert notice.startswith("bfloat16 on this CPU does not compute what float32 does") and "float32 instead" in notice


PROBE = """
import torch
from types import SimpleNamespace
from reid_utils import speed
from reid_utils.model import build_model
torch.manual_seed(0)
model = build_model(SimpleNamespace(num_classes=8, backbone="resnet18", droprate=0.5, stride=2, linear_num=512,
                                    bnneck=False))
speed.cpu_has_bf16 = lambda: True  # a laptop without AVX-512 BF16 would stop before the step; here it is taken
dtype, notice = speed.choose_precision(torch.device("cpu"), bf16=True, model=model, image_size=(32, 16))
print(dtype, round(speed.bf16_step_error(model, (32, 16)), 2), torch.backends.cpu.get_cpu_capability(), notice)
"""


@pytest.mark.parametrize(
    "setting", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}]
)
def test_the_bf16_check_decides_the_same_on_other_cpu_kernels(setting):
    """ATen's vector kernels for AVX2 or none, and oneDNN without AVX-512 (laptops): the check agrees with
    float32 on each, so bfloat16 is kept, not refused by a difference that is only rounding."""
    environment = {**os.environ, **setting, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, check=True)
    dtype, error, capability, *notice = done.stdout.split()
    assert (dtype, notice) == ("torch.bfloat16", [])
    assert float(error) <= BF16_STEP_TOLERANCE
    if "ATEN_CPU_CAPABILITY" in setting:
        assert capability == setting["ATEN_CPU_CAPABILITY"].upper()


class _Loader(list):
    """A list of batches with the ``batch_size`` the loop's short-batch check reads."""

    @property
    def batch_size(self) -> int:
        return len(self[0][0])


def test_the_loops_autocast_covers_the_forward_pass_and_the_loss_only():
    """bfloat16 in the loop: the forward pass runs in bfloat16, gradients land on the float32 weights in float32,
    and the loss the loop adds up is float32's."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    seen = []
    linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.0)
    loader = _Loader([(torch.randn(3, 8), torch.tensor([0, 1, 2]))])
    device = torch.device("cpu")
    result = train_one_phase(linear, loader, "train", nn.CrossEntropyLoss(), optimizer, device, torch.bfloat16)
    assert seen == [torch.bfloat16] and linear.weight.grad.dtype == torch.float32
    assert math.isfinite(result.loss)
    train_one_phase(linear, loader, "train", nn.CrossEntropyLoss(), optimizer, device)
    assert seen[-1] == torch.float32  # without dtype: float32, as ever


def _one_step(in_the_loop: bool) -> list[torch.Tensor]:
    """One SGD step with float16-style loss scaling, taken by the loop or by hand; returns the new weights."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    criterion = nn.CrossEntropyLoss()
    inputs, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0])
    if in_the_loop:  # what the trainer does: train_one_phase with the scaler
        result = train_one_phase(model, _Loader([(inputs, labels)]), "train", criterion, optimizer,
                                 torch.device("cpu"), scaler=scaler)  # fmt: skip
        loss = torch.tensor(result.loss)
    else:  # the GradScaler recipe of the PyTorch documentation
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()] + [loss.detach()]


def test_loss_scaling_in_the_loop_is_the_gradscaler_recipe():
    loop, recipe = _one_step(True), _one_step(False)
    for a, b in zip(loop, recipe, strict=True):
        assert torch.equal(a, b)  # identical weights, and the loss the loop adds up is the unscaled one


def test_a_scaled_step_with_an_infinite_gradient_is_skipped():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loader = _Loader([(torch.ones(1, 2), torch.zeros(1))])
    train_one_phase(model, loader, "train", lambda out, labels: out.sum() * float("inf"), optimizer,
                    torch.device("cpu"), scaler=scaler)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() < 2.0**10  # the factor backs off


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: where the process's allocated memory lives."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def test_reuse_freed_memory_keeps_large_blocks_in_the_process():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    assert speed_module.reuse_freed_memory()  # Linux with glibc, as CI
    mapped_before = libc.mallinfo2().hblkhd  # bytes in blocks mapped from the OS one by one (unmapped when freed)
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, more than glibc's own 32 MiB limit for the heap
    mapped_during = libc.mallinfo2().hblkhd
    del block
    # without the setting glibc maps such a block on its own and hands it back when it is freed; now it comes
    # from the heap, and the heap keeps it for the next step
    assert mapped_during - mapped_before < 64 << 20
    assert libc.mallinfo2().arena >= 64 << 20
