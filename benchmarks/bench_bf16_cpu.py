"""Does ``--bf16`` on this CPU train as float32 does? Loss curves side by side, and the start-up check.

For each image size, the demo model (ResNet-18 from random weights) trains on the embedded synthetic set
twice from the same seed, once in float32 and once with ``--bf16``, and the script prints both curves
(training loss and validation error per epoch) and how far apart they end up: the largest relative
difference of the training loss over the epochs. Then the start-up check of ``reid_utils.speed``: the
gradient-size factor of one bfloat16 step against float32 (``bf16_step_error``) and its time.

``--without_float32_convs`` leaves out the float32 convolutions on one-pixel maps (``speed.needs_float32``),
to see what they prevent. On a CPU without native bfloat16 the ``--bf16`` runs fall back to float32 and the
script says so. Run from the repository root::

    python benchmarks/bench_bf16_cpu.py                       # 32x16, 48x24, 64x32, 5 epochs each
    python benchmarks/bench_bf16_cpu.py --sizes 48x24 --epochs 2 --without_float32_convs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from reid_utils import speed
from reid_utils.data import default_data_root, find_dataset
from reid_utils.model import build_model
from reid_utils.prepare import prepare_market
from reid_utils.profiles import PROFILES
from reid_utils.train import TrainError, TrainOptions, train


def curves(prepared: Path, work: Path, size: tuple[int, int], epochs: int, bf16: bool) -> dict[str, list[float]]:
    """One run of the demo model at this size; the training loss and val error of each epoch (NaN: diverged)."""
    settings = {**PROFILES["cpu-demo"], "height": size[0], "width": size[1], "total_epoch": epochs}
    options = TrainOptions(
        **{**settings, "save_every": epochs, "bf16": bf16, "pretrained": False, "name": f"bf16_{bf16}"},
        data_dir=str(prepared), model_dir=str(work),
    )  # fmt: skip
    try:
        history = train(options, overwrite=True, quiet=True)
    except TrainError as err:  # "the training loss became nan in epoch N"
        print(f"  {'bf16' if bf16 else 'fp32'}: {err}".splitlines()[0])
        return {"train_loss": [float("nan")] * epochs, "val_err": [float("nan")] * epochs}
    return {"train_loss": history["train_loss"], "val_err": history["val_err"]}


def startup_check(size: tuple[int, int]) -> str:
    """The check ``--bf16`` runs before training, on the demo model at this size: its factor and time."""
    torch.manual_seed(0)
    model = build_model(TrainOptions(**{**PROFILES["cpu-demo"], "num_classes": 48}))
    started = time.perf_counter()
    factor = speed.bf16_step_error(model, size)
    seconds = time.perf_counter() - started
    verdict = "kept" if factor <= speed.BF16_STEP_TOLERANCE else "refused"
    allowed = speed.BF16_STEP_TOLERANCE
    return f"start-up check: gradients up to {factor:.3g}x off (allowed {allowed:g}x): bf16 {verdict}; {seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["32x16", "48x24", "64x32"], help="HxW image sizes")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--without_float32_convs", action="store_true", help="to see the oneDNN bug they avoid")
    parser.add_argument("--data_dir", type=Path, help="a prepared data set (default: the embedded synthetic set)")
    args = parser.parse_args(argv)
    if args.without_float32_convs:
        speed._float32_on_tiny_maps = lambda *_: None  # every convolution in bfloat16, as before the fix
    native = "native" if speed.cpu_has_bf16() else "none (the --bf16 runs train in float32)"
    kernels = torch.backends.cpu.get_cpu_capability()
    print(f"CPU bfloat16: {native}; torch {torch.__version__}, {torch.get_num_threads()} threads, ATen {kernels}")
    prepared = args.data_dir
    if prepared is None:
        location = find_dataset(quiet=True)
        prepared = prepare_market(location.path, default_data_root() / "prepared" / location.path.name, quiet=True).root
    with tempfile.TemporaryDirectory(prefix="bf16-cpu-") as work:
        for text in args.sizes:
            size = tuple(int(side) for side in text.split("x"))
            print(f"{text}: {startup_check(size)}")
            fp32, bf16 = (curves(prepared, Path(work), size, args.epochs, flag) for flag in (False, True))
            for name in ("train_loss", "val_err"):
                print(f"  {name:<10} fp32 {' '.join(f'{v:6.3f}' for v in fp32[name])}")
                print(f"  {'':<10} bf16 {' '.join(f'{v:6.3f}' for v in bf16[name])}")
            gaps = [abs(b - a) / a for a, b in zip(fp32["train_loss"], bf16["train_loss"], strict=True)]
            worst = max(gaps, key=lambda gap: gap if gap == gap else float("inf"))  # NaN counts as the worst
            print(f"  bf16 follows float32: training loss at most {worst:.1%} apart over {args.epochs} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
