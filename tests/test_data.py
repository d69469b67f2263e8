import os
from pathlib import Path

import pytest
import torch

from reid_utils.data import (
    ClassicData,
    MarketNameError,
    build_dataloaders,
    build_transforms,
    find_dataset,
    parse_market_name,
)


def test_parse_regular_name():
    name = parse_market_name("0002_c1s1_000451_03.jpg")
    assert (name.pid, name.camera, name.sequence, name.frame, name.box) == (2, 1, 1, 451, 3)


def test_parse_accepts_paths_and_special_pids():
    assert parse_market_name(Path("/x/bounding_box_test/-1_c3s2_012345_02.jpg")).pid == -1
    assert parse_market_name("0000_c6s4_002202_01.jpg").pid == 0
    assert parse_market_name("1501_c6s4_002202_01.jpg").camera == 6


@pytest.mark.parametrize(
    "bad",
    ["Thumbs.db", "0002_c1s1_000451_03.png", "2_c1s1_000451_03.jpg", "0002_c1_000451_03.jpg", "0002c1s1.jpg"],
)
def test_parse_rejects_and_names_the_file(bad):
    with pytest.raises(MarketNameError, match=bad.replace(".", r"\.")):
        parse_market_name(bad)


def test_find_dataset_prefers_argument_then_env(tiny_market, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MARKET1501_DIR", raising=False)
    monkeypatch.delenv("REID_DATASET", raising=False)
    assert find_dataset(tiny_market).path == tiny_market
    assert "Using Market-1501" in capsys.readouterr().out
    monkeypatch.setenv("MARKET1501_DIR", str(tiny_market))
    location = find_dataset(data_root=tmp_path)
    assert location.path == tiny_market and not location.synthetic


def test_forcing_the_synthetic_set(tiny_market, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MARKET1501_DIR", str(tiny_market))
    monkeypatch.setenv("REID_DATASET", "synthetic")
    location = find_dataset(data_root=tmp_path)
    assert location.synthetic and (location.path / "SYNTHETIC.json").is_file()
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # one line says so


def test_find_dataset_rejects_a_wrong_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MARKET1501_DIR", raising=False)
    monkeypatch.delenv("REID_DATASET", raising=False)
    with pytest.raises(FileNotFoundError, match="not a Market-1501 folder"):
        find_dataset(tmp_path)
    monkeypatch.setenv("MARKET1501_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"MARKET1501_DIR={tmp_path / 'nowhere'} is not"):
        find_dataset(data_root=tmp_path)


def test_find_dataset_finds_market_in_data_root(tiny_market, tmp_path, monkeypatch):
    monkeypatch.delenv("MARKET1501_DIR", raising=False)
    monkeypatch.delenv("REID_DATASET", raising=False)
    os.symlink(tiny_market, tmp_path / "Market-1501-v15.09.15")
    location = find_dataset(data_root=tmp_path, quiet=True)
    assert location.path == tmp_path / "Market-1501-v15.09.15" and not location.synthetic


def test_train_transform_shapes_and_randomness(tiny_market):
    from PIL import Image

    image = Image.open(next((tiny_market / "bounding_box_train").glob("*.jpg")))
    tfs = build_transforms(height=64, width=32, erasing_p=1.0, color_jitter=True)
    torch.manual_seed(0)
    a, b = tfs["train"](image), tfs["train"](image)
    assert a.shape == b.shape == (3, 64, 32)
    assert not torch.equal(a, b)  # random crop / flip / erasing differ between calls
    val = build_transforms()["val"]
    assert val(image).shape == (3, 256, 128)
    assert torch.equal(val(image), val(image))  # the test transform is deterministic


def test_transform_rejects_bad_values():
    with pytest.raises(ValueError, match="erasing_p"):
        build_transforms(erasing_p=1.5)


def test_dataloaders_like_the_classic_train_py(tiny_prepared):
    loaders, sizes, classes = build_dataloaders(tiny_prepared, batch_size=4, height=64, width=32)
    assert sizes["val"] == len(classes) == 8  # one val image per training identity
    images, labels = next(iter(loaders["train"]))
    assert images.shape == (4, 3, 64, 32) and labels.dtype == torch.int64
    assert int(labels.max()) < len(classes)
    _, sizes_all, _ = build_dataloaders(tiny_prepared, batch_size=4, train_all=True, height=64, width=32)
    assert sizes_all["train"] == sizes["train"] + sizes["val"]


def test_dataloaders_explain_an_unprepared_folder(tiny_market):
    with pytest.raises(FileNotFoundError, match="reid_utils.prepare"):
        build_dataloaders(tiny_market)


def test_sharded_dataloaders_split_each_epoch_between_processes(tiny_prepared):
    shards = [
        build_dataloaders(tiny_prepared, 4, height=32, width=16, shard=(rank, 2), backend=ClassicData(0))[0]["train"]
        for rank in (0, 1)
    ]
    n = len(shards[0].dataset)
    indices = []
    for loader in shards:
        assert isinstance(loader.sampler.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(3)
        keys = list(loader.sampler)  # (index, epoch): each image's augmentation is seeded by what it is
        assert {epoch for _, epoch in keys} == {3}
        indices.append([index for index, _ in keys])
        labels = torch.cat([labels for _, labels in loader])
        assert labels.tolist() == [loader.dataset.targets[i] for i in indices[-1]]  # the loader follows its shard
    assert len(indices[0]) == len(indices[1]) == -(-n // 2)
    assert set(indices[0]) | set(indices[1]) == set(range(n)) and len(set(indices[0]) & set(indices[1])) <= n % 2
    pk = build_dataloaders(
        tiny_prepared, batch_size=4, height=32, width=16, instances=2, shard=(1, 2), backend=ClassicData(0)
    )
    assert pk[0]["train"].sampler.sampler.rank == 1 and pk[0]["train"].sampler.sampler.world == 2


def test_loading_augmented_images_leaves_every_global_generator_alone(tiny_prepared, monkeypatch):
    """Each image's augmentation is seeded from (seed, epoch, image) on a side generator state: the CPU generator
    that dropout draws from is restored, and the GPU's is never re-seeded (on a GPU, dropout draws from it)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    loaders, _, _ = build_dataloaders(tiny_prepared, batch_size=8, height=32, width=16, erasing_p=0.5, seed=0)
    before = torch.get_rng_state()
    first = next(iter(loaders["train"]))[0]
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []
    assert torch.equal(next(iter(loaders["train"]))[0], first)  # the same epoch: the same augmented pixels
