"""Speed-only machinery: precision choices, the CPU's bfloat16, float16 loss scaling around the loop, the allocator."""

import ctypes

import torch
from torch import nn

import reid_utils.speed as speed_module
from reid_utils.speed import Autocast, ScaledLoss, ScaledOptimizer, choose_precision


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
    assert choose_precision(cpu, bf16=True, image_size=(64, 32)) == (torch.bfloat16, "")
    dtype, notice = choose_precision(cpu, bf16=True, image_size=(32, 16))  # oneDNN's wrong gradients there
    assert dtype is None and "48x24" in notice and "float32" in notice
    # CUDA: only the device's answer is mocked, nothing runs on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    dtype, notice = choose_precision(cuda, bf16=True)
    assert dtype == torch.float16 and "float16 with loss scaling" in notice
    assert choose_precision(cuda) == (None, "")  # float32, as the classic script, unless asked
    assert choose_precision(cuda, fp16=True) == (torch.float16, "")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_precision(cuda, bf16=True) == (torch.bfloat16, "")


def test_autocast_wraps_only_the_forward_pass():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    wrapped = Autocast(linear, "cpu", torch.bfloat16)
    x = torch.randn(3, 8)
    assert wrapped(x).dtype == torch.bfloat16 and linear(x).dtype == torch.float32
    wrapped(x).float().sum().backward()
    assert linear.weight.grad.dtype == torch.float32  # gradients land on the float32 weights


def _one_step(scaled_around_the_loop: bool) -> list[torch.Tensor]:
    """One SGD step with float16-style loss scaling, written either way; returns the new weights."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    criterion = nn.CrossEntropyLoss()
    inputs, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0])
    if scaled_around_the_loop:  # what the trainer does: the loop stays loss.backward(); optimizer.step()
        criterion, step = ScaledLoss(criterion, scaler), ScaledOptimizer(optimizer, scaler)
        step.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        step.step()
    else:  # the GradScaler recipe of the PyTorch documentation
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()] + [loss.detach()]


def test_loss_scaling_around_the_loop_is_the_gradscaler_recipe():
    around, recipe = _one_step(True), _one_step(False)
    for a, b in zip(around, recipe, strict=True):
        assert torch.equal(a, b)  # identical weights, and the loss the loop adds up is the unscaled one


def test_a_scaled_step_with_an_infinite_gradient_is_skipped():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = ScaledOptimizer(optimizer, scaler)
    loss = ScaledLoss(lambda out: out.sum() * float("inf"), scaler)(model(torch.ones(1, 2)))
    loss.backward()
    step.step()
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
