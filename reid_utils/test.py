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

from reid_utils.data import ClassicData, DataBackend, check_test_folder, display_path, error_line, parse_market_name
from reid_utils.fastdata import CachedData
from reid_utils.files import write_problem
from reid_utils.metrics import Evaluation, evaluate
from reid_utils.model import ReIDNet, build_model, check_weights_fit, select_device, unwrap
from reid_utils.runs import (
    DamagedCheckpointError,
    TrainError,
    TrainOptions,
    check_checkpoint_matches,
    check_run_name,
    checkpoints_newest_first,
    load_checkpoint,
    load_options,
    save_torch,
)


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


def choose_checkpoint(run: Path, which_epoch: str | int = "last") -> Path:
    """The checkpoint to evaluate: the newest (``"last"``) or the one saved after epoch ``which_epoch``.

    A damaged checkpoint that may be the newest is an error, not something to step over: the numbers
    would silently belong to older weights.
    """
    found = checkpoints_newest_first(run)
    readable = [(path, epoch) for path, epoch in found if epoch is not None]
    if which_epoch == "last":
        if not found:
            raise TrainError(f"{run} holds no checkpoint yet (net_XXX.pth or net_last.pth). Train it first.")
        damaged = [path for path, epoch in found if epoch is None]
        if damaged:
            earlier = f" Evaluate an earlier one with --which_epoch {readable[0][1]}," if readable else ""
            raise DamagedCheckpointError(
                f"{damaged[0]} cannot be read (empty or cut short).{earlier} or train the run again."
            )
        return found[0][0]
    for path, epoch in readable:
        if epoch == int(which_epoch):
            return path
    saved = ", ".join(str(epoch) for _, epoch in sorted(readable, key=lambda item: item[1])) or "none"
    raise TrainError(f"{run} has no checkpoint of epoch {which_epoch} (saved epochs: {saved}).")


def load_trained_model(
    run: str | os.PathLike, device: torch.device | str = "cpu", which_epoch: str | int = "last"
) -> tuple[ReIDNet, TrainOptions]:
    """Rebuild a run's network from its ``opts.yaml`` and load its newest (or ``which_epoch``'s) checkpoint."""
    run = Path(run)
    if not run.is_dir():
        raise TrainError(f"no run at {run}. Check --name and --model_dir: they must match the ones used for training.")
    opts = load_options(run)
    checkpoint_path = choose_checkpoint(run, which_epoch)
    checkpoint = load_checkpoint(checkpoint_path)
    try:
        check_checkpoint_matches(checkpoint, opts, checkpoint_path)
    except TrainError as err:
        raise TrainError(str(err)) from None
    model = build_model(opts)
    try:
        check_weights_fit(model, checkpoint["model"], str(checkpoint_path))
    except ValueError as err:
        raise TrainError(str(err)) from None
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), opts


def evaluate_features(query: FeatureSet, gallery: FeatureSet, ap: str = "market") -> Evaluation:
    return evaluate(query.features, query.pids, query.cams, gallery.features, gallery.pids, gallery.cams, ap=ap)


def evaluate_run(
    run: str | os.PathLike,
    data_dir: str | os.PathLike,
    backend: DataBackend | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> Evaluation:
    """A trained run's CMC and mAP on a prepared folder: rebuild, extract query and gallery features, evaluate."""
    model, opts = load_trained_model(run, device)
    sets = [
        extract_features(model, evaluation_loader(Path(data_dir) / split, opts.height, opts.width, batch_size, backend),
                         device=device)
        for split in ("query", "gallery")
    ]  # fmt: skip
    return evaluate_features(*sets)


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
    parser.add_argument("--which_epoch", default="last", help="'last' (the newest checkpoint) or an epoch number")
    args = parser.parse_args(argv)
    if args.which_epoch != "last" and not args.which_epoch.isdigit():
        parser.error(f"--which_epoch must be 'last' or an epoch number, not {args.which_epoch!r}")
    run = Path(args.model_dir) / args.name
    try:
        check_run_name(args.name)
        device, _ = select_device(args.gpu_ids)
        model, opts = load_trained_model(run, device, args.which_epoch)
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
        print(f"test: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, what shells report for Ctrl-C
        print("\ntest: interrupted; nothing was written. Run the same command again.", file=sys.stderr)
        return 130
    print(result.summary())  # the numbers first: a failure to save must not lose them
    features = {split: vars(feature_set) for split, feature_set in sets.items()}
    try:
        target = save_torch(features, run / "features.pt")
    except OSError as err:
        reason = write_problem(err) or err.strerror or str(err)
        print(f"test: error: the results above are complete, but {run / 'features.pt'} could not be written "
              f"({reason}).", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print(f"\ntest: interrupted; the results above are complete, {run / 'features.pt'} was not written.",
              file=sys.stderr)  # fmt: skip
        return 130
    print(f"Features saved to {display_path(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
