"""The real path's code, run on the CPU: the ``market-gpu`` profile (ResNet-50 at 256x128, the fast data path,
channels_last, bfloat16 or its float32 fallback) for one short epoch on a small Market-format set, then
extraction and evaluation through the functions notebooks 03 and 04 call."""

import numpy as np
import pytest
import torch

from reid_utils.fastdata import CachedData
from reid_utils.prepare import prepare_market
from reid_utils.profiles import PROFILES
from reid_utils.runs import load_checkpoint
from reid_utils.speed import cpu_has_bf16
from reid_utils.synthetic import generate_market
from reid_utils.test import evaluate_features, evaluation_loader, extract_features, load_trained_model
from reid_utils.train import TrainOptions, train


@pytest.fixture()
def small_prepared(tmp_path):
    """4 training identities (41 images: one batch of 32 at the profile's batch size) and 25 test images:
    a training step of ResNet-50 at 256x128 costs ~16 GFLOP per image (benchmarks/RESULTS.md)."""
    market = generate_market(tmp_path / "Market", seed=3, train_ids=4, test_ids=3).root
    return prepare_market(market, tmp_path / "prepared", quiet=True).root


def test_the_market_gpu_profile_runs_end_to_end_on_the_cpu(small_prepared, tmp_path, capsys):
    profile = PROFILES["market-gpu"]
    options = TrainOptions(
        **{**profile, "total_epoch": 1}, data_dir=str(small_prepared), model_dir=str(tmp_path / "model")
    )
    history = train(options)  # as notebook 03 runs it: notices printed
    out = capsys.readouterr().out
    assert "No CUDA GPU found: running on the CPU instead of GPU 0." in out  # --gpu_ids 0 on a laptop
    assert "resnet50: ImageNet weights are not available offline" in out  # the tests never download
    if not cpu_has_bf16():
        assert "no native bfloat16" in out  # falls back to float32 with one line
    assert len(history["train_loss"]) == 1 and np.isfinite(history["train_loss"][0])

    run = tmp_path / "model" / profile["name"]
    saved = load_checkpoint(run / "net_last.pth")
    assert {key: saved["options"][key] for key in ("backbone", "height", "width", "fast_data", "channels_last",
                                                  "bf16", "train_all")} == {
        "backbone": "resnet50", "height": 256, "width": 128, "fast_data": True, "channels_last": True, "bf16": True,
        "train_all": True,
    }  # fmt: skip
    assert all(torch.isfinite(value.float()).all() for value in saved["model"].values())

    model, opts = load_trained_model(run)  # notebook 04: the run this profile names
    assert model.backbone[7][0].conv1.in_channels == 1024  # ResNet-50's layer4
    features = {
        split: extract_features(model, evaluation_loader(small_prepared / split, opts.height, opts.width, 32,
                                                         CachedData(channels_last=True)))
        for split in ("query", "gallery")
    }  # fmt: skip
    assert features["query"].features.shape[1] == 512
    torch.testing.assert_close(features["gallery"].features.norm(dim=1), torch.ones(len(features["gallery"].paths)))
    result = evaluate_features(features["query"], features["gallery"])
    assert 0 < result.mAP <= 1 and result.num_queries_evaluated == len(features["query"].paths)
