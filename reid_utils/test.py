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

from reid_utils.data import ClassicData, DataBackend, check_test_folder, display_path, parse_market_name
from reid_utils.fastdata import CachedData
from reid_utils.files import atomic_write
from reid_utils.metrics import Evaluation, evaluate
from reid_utils.model import ReIDNet, build_model, check_weights_fit, select_device, unwrap
from reid_utils.runs import TrainError, TrainOptions, latest_checkpoint, load_checkpoint, load_options


@dataclass
class FeatureSet:
    """Embeddings of one folder (query or gallery) with the identity and camera of every image."""

    features: torch.Tensor  # N x D, each row L2-normalised
    pids: np.ndarray  # -1 junk, 0 distractor
    cams: np.ndarray
    paths: list[str]


def evaluation_loader(
    folder: str | os.PathLike, height: int, width: int, batch_size: int = 64, backend: DataBackend | None = None
):
    """Images of a prepared ``query/`` or ``gallery/`` folder in a fixed order, with the test transform.

    ``backend`` is the data path, as for training: ``ClassicData()`` (default) or ``fastdata.CachedData()``.
    """
    folder = Path(folder)
    check_test_folder(folder)
    backend = ClassicData() if backend is None else backend
    return backend.loader(backend.dataset(folder, height, width), batch_size)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    flip: bool = True,
    device: torch.device | str = "cpu",
) -> FeatureSet:
    """The embedding of every image, plus that of its mirror image, summed and L2-normalised.

    A person seen from the left and from the right is still the same person: adding the
    flipped view makes the description symmetric and a little more robust. Normalising makes
    the dot product of two features their cosine similarity, which evaluation ranks by.
    """
    net = unwrap(model)
    net.eval().to(device)
    batches = []
    for images, _ in loader:
        images = images.to(device)
        features = net.embed(images)
        if flip:
            features = features + net.embed(torch.flip(images, dims=[3]))  # dim 3 = width: a mirror image
        batches.append(nn.functional.normalize(features, dim=1).float().cpu())
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
    model = build_model(opts)
    state = load_checkpoint(checkpoint_path)["model"]
    try:
        check_weights_fit(model, state, str(checkpoint_path))
    except ValueError as err:
        raise TrainError(str(err)) from None
    model.load_state_dict(state)
    return model.to(device).eval(), opts


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
    parser.add_argument("--fast_data", action="store_true", help="decode the images once, normalise whole batches")
    args = parser.parse_args(argv)
    run = Path(args.model_dir) / args.name
    try:
        device, _ = select_device(args.gpu_ids)
        model, opts = load_trained_model(run, device)
        backend = CachedData(device=device) if args.fast_data else ClassicData()
        sets = {
            split: extract_features(
                model, evaluation_loader(Path(args.data_dir) / split, opts.height, opts.width, args.batchsize, backend),
                flip=not args.no_flip, device=device,
            )
            for split in ("query", "gallery")
        }  # fmt: skip
        result = evaluate_features(sets["query"], sets["gallery"], ap=args.ap)
    except (TrainError, FileNotFoundError, ValueError) as err:
        print(f"test: error: {err}", file=sys.stderr)
        return 2
    features = {split: vars(feature_set) for split, feature_set in sets.items()}
    target = atomic_write(run / "features.pt", lambda tmp: torch.save(features, tmp))
    print(result.summary())
    print(f"Features saved to {display_path(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
