"""Our training against the classic script's, side by side: same model, data, batch size and epochs.

The classic ``train.py`` of the ResNet-50 baseline (layumi/Person_reID_baseline_pytorch) trains with
``torchvision`` transforms on ``ImageFolder`` images, a ``DataLoader`` with two worker processes, plain SGD, a
step schedule, and the loop notebook 03 quotes. ``classic_run`` below is that loop and that data pipeline,
written again here (on the CPU, without ``Variable``, with ``.to(device)`` for ``.cuda()``) so that it can run
next to ours. It is timed against:

* ``ours``       -- ``reid_utils.train.train`` with its defaults (the classic data path, fused SGD, checkpoints,
  the curves), and
* ``ours fast``  -- the same with ``--fast_data`` (images decoded once, batches augmented as tensors).

Every run trains a fresh network from the same initial weights (``--seed``) for ``--epochs`` epochs, train and
val phases both. The three take turns (A B C, then C B A, ...), so a machine whose speed drifts slows them
alike; the ratios are of the median times. Run from the repository root::

    python benchmarks/bench_vs_classic.py                  # ResNet-18 at 64x32, the demo; ~3 minutes on 2 cores
    python benchmarks/bench_vs_classic.py --backbone resnet50 --height 256 --width 128 --epochs 1 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from reid_utils.data import IMAGENET_MEAN, IMAGENET_STD, default_data_root, default_pad, find_dataset
from reid_utils.model import ReIDNet, parameter_groups
from reid_utils.prepare import prepare_market
from reid_utils.train import TrainOptions, train


def classic_loaders(data_dir: Path, batch_size: int, height: int, width: int, seed: int):
    """The classic script's data: ImageFolder, its transforms, DataLoader(shuffle, 2 workers, pinned memory)."""
    train_list = [
        transforms.Resize((height, width), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.Pad(default_pad(height)),  # the script pads 10 pixels at 256x128; scaled like ours
        transforms.RandomCrop((height, width)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    val_list = [
        transforms.Resize((height, width), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    image_datasets = {
        "train": datasets.ImageFolder(str(data_dir / "train"), transforms.Compose(train_list)),
        "val": datasets.ImageFolder(str(data_dir / "val"), transforms.Compose(val_list)),
    }
    loaders = {
        phase: torch.utils.data.DataLoader(
            image_datasets[phase], batch_size=batch_size, shuffle=True, num_workers=2,
            pin_memory=torch.cuda.is_available(), persistent_workers=True,
            generator=torch.Generator().manual_seed(seed),
        )
        for phase in ("train", "val")
    }  # fmt: skip
    return loaders, {phase: len(image_datasets[phase]) for phase in ("train", "val")}, image_datasets["train"].classes


def classic_run(data_dir: Path, args: argparse.Namespace) -> float:
    """The classic script's whole training, as it writes it; returns the final train loss."""
    torch.manual_seed(args.seed)
    loaders, dataset_sizes, class_names = classic_loaders(data_dir, args.batchsize, args.height, args.width, args.seed)
    torch.manual_seed(args.seed)
    model = ReIDNet(len(class_names), args.backbone, pretrained=False, quiet=True)
    groups = parameter_groups(model, args.lr)  # the backbone at 0.1x, the new layers at lr: as the script splits
    optimizer = torch.optim.SGD(groups, weight_decay=5e-4, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.epochs * 2 // 3), gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    epoch_loss = float("nan")
    for _epoch in range(args.epochs):
        for phase in ("train", "val"):
            model.train(phase == "train")
            running_loss, running_corrects = 0.0, 0.0
            for inputs, labels in loaders[phase]:
                now_batch_size = inputs.shape[0]
                if now_batch_size < args.batchsize:  # skip the last batch, in both phases
                    continue
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                if phase == "val":
                    with torch.no_grad():
                        outputs = model(inputs)
                else:
                    outputs = model(inputs)
                _, preds = torch.max(outputs.data, 1)
                loss = criterion(outputs, labels)
                if phase == "train":
                    loss.backward()
                    optimizer.step()
                running_loss += loss.item() * now_batch_size
                running_corrects += float(torch.sum(preds == labels.data))
            epoch_loss = running_loss / dataset_sizes[phase] if phase == "train" else epoch_loss
            if phase == "train":
                scheduler.step()
    return epoch_loss


def our_run(data_dir: Path, args: argparse.Namespace, fast: bool) -> float:
    options = TrainOptions(
        name="bench", data_dir=str(data_dir), model_dir=tempfile.mkdtemp(prefix="bench-vs-classic-"), gpu_ids="",
        backbone=args.backbone, height=args.height, width=args.width, batchsize=args.batchsize, lr=args.lr,
        total_epoch=args.epochs, save_every=args.epochs, seed=args.seed, pretrained=False, fast_data=fast,
    )  # fmt: skip
    return train(options, quiet=True)["train_loss"][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batchsize", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times each of the three runs, in turns")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    location = find_dataset(quiet=True)
    data_dir = prepare_market(location.path, default_data_root() / "prepared" / location.path.name, quiet=True).root
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.backbone} at {args.height}x{args.width}, batch {args.batchsize}, {args.epochs} epochs per run, "
          f"data {location.path.name}")  # fmt: skip
    runs = {
        "classic script": lambda: classic_run(data_dir, args),
        "ours": lambda: our_run(data_dir, args, fast=False),
        "ours fast": lambda: our_run(data_dir, args, fast=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            started = time.perf_counter()
            loss = runs[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"round {round_index + 1}  {name:<15} {seconds[name][-1]:6.1f} s  (final train loss {loss:.3f})",
                  flush=True)  # fmt: skip
    classic = statistics.median(seconds["classic script"])
    print()
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<15} median {median:6.1f} s for {args.epochs} epochs: x{classic / median:.2f} the classic script")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
