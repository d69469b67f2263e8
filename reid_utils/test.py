"""Test a trained run: rebuild it, extract query and gallery features, evaluate.

``python -m reid_utils.test --name ft_ResNet50 --data_dir <prepared> [--model_dir model]``

The model is rebuilt from the run's ``opts.yaml`` (so the backbone, stride and input size always
match training), its checkpoint loaded, and every image described by its flip-averaged, L2-normalised
embedding. Features, pids and cameras are saved to ``<model_dir>/<name>/features.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reid_utils.data import (
    build_transforms,
    check_test_folder,
    default_num_workers,
    display_path,
    image_folder,
    parse_market_name,
)
from reid_utils.metrics import Evaluation, evaluate
from reid_utils.model import ReIDNet, check_weights_fit
from reid_utils.train import TrainError, TrainOptions, latest_checkpoint, load_options, select_device


@dataclass
class FeatureSet:
    """Embeddings of one folder (query or gallery) with the identity and camera of every image."""

    features: torch.Tensor  # N x D, each row L2-normalised
    pids: np.ndarray  # -1 junk, 0 distractor
    cams: np.ndarray
    paths: list[str]


def evaluation_loader(folder: str | os.PathLike, height: int, width: int, batch_size: int = 64, num_workers=None):
    """Images of a prepared ``query/`` or ``gallery/`` folder in a fixed order, with the test transform."""
    folder = Path(folder)
    check_test_folder(folder)
    dataset = image_folder(folder, build_transforms(height, width)["val"])
    workers = default_num_workers() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    flip: bool = True,
    scales: tuple[float, ...] = (1.0,),
    device: torch.device | str = "cpu",
) -> FeatureSet:
    """The embedding of every image, plus that of its mirror image, summed and L2-normalised.

    A person seen from the left and from the right is still the same person: adding the
    flipped view makes the description symmetric and a little more robust. Normalising makes
    the dot product of two features their cosine similarity, which evaluation ranks by.
    ``scales`` other than 1 also add the embeddings of resized inputs (multi-scale testing).
    """
    net = model.module if isinstance(model, nn.DataParallel) else model
    net.eval().to(device)
    batches = []
    for images, _ in loader:
        images = images.to(device)
        total = 0
        for scale in scales:
            scaled = images
            if scale != 1.0:
                scaled = nn.functional.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False)
            total = total + net.embed(scaled)
            if flip:
                total = total + net.embed(torch.flip(scaled, dims=[3]))  # dim 3 = width: a mirror image
        batches.append(nn.functional.normalize(total, dim=1).float().cpu())
    paths = [path for path, _ in loader.dataset.samples]
    names = [parse_market_name(p) for p in paths]
    return FeatureSet(
        features=torch.cat(batches) if batches else torch.empty(0, 0),
        pids=np.array([n.pid for n in names], dtype=np.int64),
        cams=np.array([n.camera for n in names], dtype=np.int64),
        paths=paths,
    )


def load_trained_model(run: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[ReIDNet, TrainOptions]:
    """Rebuild a run's network from its ``opts.yaml`` and load its newest checkpoint."""
    run = Path(run)
    if not run.is_dir():
        raise TrainError(f"no run at {run}. Check --name and --model_dir: they must match the ones used for training.")
    opts = load_options(run)
    checkpoint_path = latest_checkpoint(run)
    if checkpoint_path is None:
        raise TrainError(f"{run} holds no checkpoint yet (net_XXX.pth or net_last.pth). Train it first.")
    model = ReIDNet(
        opts.num_classes, opts.backbone, opts.droprate, opts.stride, opts.linear_num,
        pretrained=False, bnneck=opts.bnneck,
    )  # fmt: skip
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["model"]
    try:
        check_weights_fit(model, state, str(checkpoint_path))
    except ValueError as err:
        raise TrainError(str(err)) from None
    model.load_state_dict(state)
    return model.to(device).eval(), opts


def trained_demo_run(prepared: str | os.PathLike, model_dir: str | os.PathLike, profile: str = "cpu-demo") -> Path:
    """The run notebook 03 trains; trained here with the same code (and said so) when it is missing.

    Lets every notebook after 03 run on its own, in a fresh kernel, in any order.
    """
    from reid_utils.train import PROFILES, train

    options = TrainOptions(data_dir=str(prepared), model_dir=str(model_dir), **PROFILES[profile])
    run = Path(model_dir) / options.name
    if (run / "net_last.pth").is_file():
        print(f"Using the model trained in notebook 03: {display_path(run)}/net_last.pth")
    else:
        print(f"No trained model in {display_path(run)}: training it now with the settings of notebook 03.")
        train(options, overwrite=True)
    return run


def evaluate_features(query: FeatureSet, gallery: FeatureSet, ap: str = "market") -> Evaluation:
    return evaluate(query.features, query.pids, query.cams, gallery.features, gallery.pids, gallery.cams, ap=ap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_utils.test", description="Evaluate a trained run.")
    parser.add_argument("--name", default="ft_ResNet50", help="the --name used for training")
    parser.add_argument("--data_dir", required=True, help="the prepared folder (holds query/ and gallery/)")
    parser.add_argument("--model_dir", default="model")
    parser.add_argument("--gpu_ids", default="0")
    parser.add_argument("--batchsize", type=int, default=64, help="lower it if the GPU runs out of memory")
    parser.add_argument("--no_flip", action="store_true", help="do not add the mirror image's embedding")
    parser.add_argument("--ap", default="market", choices=["market", "step"])
    args = parser.parse_args(argv)
    run = Path(args.model_dir) / args.name
    try:
        device, _ = select_device(args.gpu_ids)
        model, opts = load_trained_model(run, device)
        sets = {
            split: extract_features(
                model, evaluation_loader(Path(args.data_dir) / split, opts.height, opts.width, args.batchsize),
                flip=not args.no_flip, device=device,
            )
            for split in ("query", "gallery")
        }  # fmt: skip
        result = evaluate_features(sets["query"], sets["gallery"], ap=args.ap)
    except (TrainError, FileNotFoundError, ValueError) as err:
        print(f"test: error: {err}", file=sys.stderr)
        return 2
    target = run / "features.pt"
    tmp = run / ".features.pt.tmp"
    torch.save({split: vars(s) for split, s in sets.items()}, tmp)
    os.replace(tmp, target)
    print(result.summary())
    print(f"Features saved to {display_path(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
