"""The cached data path: same pixels as the classic one, correct batched augmentation, a DataLoader-like loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

from reid_utils.data import IMAGENET_MEAN, IMAGENET_STD, ClassicData, build_dataloaders, build_transforms
from reid_utils.fastdata import (
    CachedData,
    CachedImageFolder,
    CachedLoader,
    TensorAugment,
    build_tensor_transforms,
    decode_image,
)
from reid_utils.samplers import EpochShuffle, PKSampler

H, W = 64, 32


def build_cached_loaders(data_dir, batch_size, *args, device=None, **kwargs):
    """The builder with the fast backend, as the trainer calls it with --fast_data."""
    return build_dataloaders(data_dir, batch_size, *args, backend=CachedData(device=device), **kwargs)


def cached_evaluation_loader(folder, height, width, batch_size=64, device=None):
    from reid_utils.test import evaluation_loader

    return evaluation_loader(folder, height, width, batch_size, backend=CachedData(device=device))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from reid_utils.prepare import prepare_market
    from reid_utils.synthetic import generate_market

    root = tmp_path_factory.mktemp("fastdata")
    market = generate_market(root / "Market", seed=3, train_ids=6, test_ids=4).root
    return prepare_market(market, root / "prepared", quiet=True).root


@pytest.fixture(scope="module")
def train_set(prepared):
    return CachedImageFolder(prepared / "train", H, W)


def random_images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


class IndexedImages:
    """A stand-in for a cached folder whose label is the image's own index: shows which images a loader used."""

    def __init__(self, n: int) -> None:
        self.images = torch.zeros(n, 3, 16, 8, dtype=torch.uint8)
        self.targets = torch.arange(n)

    def __len__(self) -> int:
        return len(self.targets)


# --------------------------------------------------------------------------- the cache


def test_cache_holds_the_pixels_of_pil_decode_and_resize(prepared, train_set):
    listing = datasets.ImageFolder(str(prepared / "train"))
    assert train_set.samples == listing.samples and train_set.classes == listing.classes
    assert train_set.targets.dtype == torch.int64 and train_set.targets.tolist() == listing.targets
    assert train_set.images.shape == (len(listing), 3, H, W) and train_set.images.dtype == torch.uint8
    resize = transforms.Resize((H, W), interpolation=transforms.InterpolationMode.BICUBIC)
    for index, (path, _) in enumerate(listing.samples):
        expected = torch.from_numpy(np.array(resize(datasets.folder.default_loader(path)))).permute(2, 0, 1)
        assert (train_set.images[index].int() - expected.int()).abs().max() <= 1, path
    assert train_set.nbytes == len(listing) * 3 * H * W
    image, target = train_set[3]
    assert image.shape == (3, H, W) and target == listing.targets[3]


def test_unreadable_images_stop_with_the_classic_message_or_are_skipped(prepared, tmp_path, capsys):
    import shutil

    folder = tmp_path / "val"
    shutil.copytree(prepared / "val", folder)
    broken = sorted(folder.rglob("*.jpg"))[1]
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated download
    with pytest.raises(ValueError, match=f"{broken.name} cannot be read as an image"):
        CachedImageFolder(folder, H, W)
    kept = CachedImageFolder(folder, H, W, skip_corrupt=True)
    assert "Skipped 1 unreadable image(s)" in capsys.readouterr().out
    listing = datasets.ImageFolder(str(folder))
    assert len(kept) == len(kept.targets) == len(kept.images) == len(listing) - 1
    assert str(broken) not in [path for path, _ in kept.samples]
    for index, (path, target) in enumerate(kept.samples):  # every row still holds its own image
        assert kept.targets[index] == target
        assert torch.equal(kept.images[index], torch.from_numpy(decode_image(path, H, W)).permute(2, 0, 1))


# --------------------------------------------------------------------------- batched augmentation


def test_output_shape_dtype_and_memory_format():
    images = random_images(8)
    train = build_tensor_transforms(H, W, erasing_p=0.5, color_jitter=True)["train"]
    out = train(images, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, H, W) and out.dtype == torch.float32
    cl = TensorAugment(pad=2, flip=True, channels_last=True)(images, torch.Generator().manual_seed(0))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        train(images.float())


def test_without_augmentation_it_is_the_classic_test_transform(train_set):
    val = build_transforms(H, W)["val"]
    out = build_tensor_transforms(H, W)["val"](train_set.images[:6])
    for index in range(6):
        classic = val(datasets.folder.default_loader(train_set.samples[index][0]))
        assert torch.allclose(out[index], classic, atol=1e-6)


def test_flip_mirrors_some_images_and_leaves_the_others():
    images = random_images(32)
    out = TensorAugment(flip=True)(images, torch.Generator().manual_seed(1))
    plain, mirrored = normalise(images), normalise(images.flip(3))
    is_plain = [torch.equal(o, p) for o, p in zip(out, plain, strict=True)]
    is_mirrored = [torch.equal(o, m) for o, m in zip(out, mirrored, strict=True)]
    assert all(p or m for p, m in zip(is_plain, is_mirrored, strict=True))
    assert 4 <= sum(is_mirrored) <= 28  # about half


def test_crops_are_shifted_copies_within_the_padding():
    pad = 3
    images = random_images(24)
    out = TensorAugment(pad=pad).crop_and_flip(images, torch.Generator().manual_seed(2))
    padded = F.pad(images, (pad, pad, pad, pad))
    shifts = set()
    for index in range(len(images)):
        matches = [
            (top, left)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            if torch.equal(out[index], padded[index, :, top : top + H, left : left + W])
        ]
        assert len(matches) == 1, f"image {index} is not a window of the padded image"
        shifts.add(matches[0])
    # the shift is drawn per image, vertically and horizontally
    assert len({top for top, _ in shifts}) >= 4 and len({left for _, left in shifts}) >= 4


def test_erasing_zeroes_one_box_of_the_allowed_size():
    images = torch.full((64, 3, H, W), 200, dtype=torch.uint8)  # normalised: never exactly zero
    out = TensorAugment(erasing_p=1.0)(images, torch.Generator().manual_seed(3))
    erased = 0
    slack = 0.5 * (H + W) + 1  # the box sides are rounded to whole pixels
    for image in out:
        zero = (image == 0).all(dim=0)
        assert torch.equal(zero, (image == 0).any(dim=0)), "every channel is erased"
        if not zero.any():
            continue  # torchvision also gives up after 10 boxes that do not fit
        erased += 1
        rows, cols = zero.any(dim=1).nonzero().squeeze(1), zero.any(dim=0).nonzero().squeeze(1)
        box_h, box_w = len(rows), len(cols)
        assert rows.max() - rows.min() + 1 == box_h and cols.max() - cols.min() + 1 == box_w
        assert zero.sum() == box_h * box_w, "the erased pixels form one rectangle"
        assert 0.02 * H * W - slack <= box_h * box_w <= 0.33 * H * W + slack
        assert box_h < H and box_w < W
    assert erased >= 48
    none = TensorAugment(erasing_p=0.0)(images)
    assert not (none == 0).any()


def test_colour_jitter_blends_like_torchvision():
    batch = torch.rand(4, 3, 20, 10)
    factors = torch.tensor([[0.9, 1.1, 0.95], [1.05, 0.92, 1.08], [1.0, 1.0, 1.0], [1.1, 1.1, 0.9]])
    order = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]])
    out = TensorAugment.blend_in_order(batch.clone(), factors, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for index in range(4):
        expected = batch[index]
        for which in order[index].tolist():
            expected = adjust[which](expected, factors[index, which].item())
        assert torch.allclose(out[index], expected, atol=1e-6)


def test_randomness_is_per_image_and_follows_the_generator():
    same = random_images(1).expand(16, -1, -1, -1).contiguous()  # 16 copies of one image
    train = build_tensor_transforms(H, W, erasing_p=0.5, color_jitter=True)["train"]
    out = train(same, torch.Generator().manual_seed(4))
    distinct = {tuple(image.flatten()[::97].tolist()) for image in out}
    assert len(distinct) >= 14, "each copy is augmented differently"
    jittered = TensorAugment(color_jitter=0.1)(same, torch.Generator().manual_seed(4))
    assert jittered.mean(dim=(1, 2, 3)).std() > 1e-2, "each copy gets its own brightness, contrast, saturation"
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = train(same, generator)
    generator.set_state(state)
    assert torch.equal(train(same, generator), first)
    assert not torch.equal(train(same, torch.Generator().manual_seed(6)), first)


# --------------------------------------------------------------------------- the loader


def test_shuffling_uses_every_image_once_per_epoch():
    dataset = IndexedImages(70)
    loader = CachedLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3 and loader.sampler is None and loader.dataset is dataset
    epochs = []
    for _ in range(2):
        batches = [labels for _, labels in loader]
        assert [len(b) for b in batches] == [32, 32, 6]
        epochs.append(torch.cat(batches))
        assert sorted(epochs[-1].tolist()) == list(range(70))
    assert not torch.equal(epochs[0], epochs[1]), "a new order every epoch"
    in_order = torch.cat([labels for _, labels in CachedLoader(dataset, batch_size=32)])
    assert in_order.tolist() == list(range(70))


def test_loader_follows_a_pk_sampler(train_set):
    sampler = PKSampler(train_set.targets, p=3, k=2, seed=0)
    loader = CachedLoader(train_set, batch_size=6, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert loader.sampler is sampler and len(loader) == sampler.num_batches
    first_epoch = []
    for images, labels in loader:
        assert images.shape == (6, 3, H, W)
        assert sorted(torch.bincount(labels).tolist())[-3:] == [2, 2, 2]  # 3 identities x 2 images
        first_epoch.append(labels)
    sampler.set_epoch(1)
    assert not torch.equal(torch.cat(first_epoch), torch.cat([labels for _, labels in loader]))
    with pytest.raises(ValueError, match="mutually exclusive"):
        CachedLoader(train_set, 6, shuffle=True, sampler=sampler)


def test_restoring_the_generator_replays_the_next_batch(train_set):
    augment = TensorAugment(pad=2, flip=True, color_jitter=0.1, erasing_p=0.5)
    loader = CachedLoader(train_set, 8, augment, shuffle=True, generator=torch.Generator().manual_seed(1))
    list(loader)  # an epoch has gone by
    state = loader.generator.get_state()
    images, labels = next(iter(loader))
    loader.generator.set_state(state)
    again_images, again_labels = next(iter(loader))
    assert torch.equal(labels, again_labels) and torch.equal(images, again_images)


def test_an_epochs_batches_follow_from_the_seed_and_the_epoch_alone(train_set):
    """What makes a resumed run exact without saving the loader: epoch 3 is epoch 3, whatever came before."""

    def epoch(loader, number):
        loader.sampler.set_epoch(number)
        return [batch for batch in loader]

    def fresh():
        return build_cached_loaders(train_set.root.parent, 8, height=H, width=W, erasing_p=0.5, color_jitter=True)[0]

    ran_on = fresh()["train"]
    for number in range(3):
        epoch(ran_on, number)
    third, again = epoch(ran_on, 3), epoch(fresh()["train"], 3)  # a resumed run starts straight at epoch 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(third, again, strict=True))
    assert not torch.equal(third[0][0], epoch(ran_on, 4)[0][0])  # and the next epoch differs


# --------------------------------------------------------------------------- the device (GPU) path


class DeviceMixing(TorchDispatchMode):
    """Records every torch operation that mixes tensors of two devices (0-d CPU scalars aside, as torch allows).

    With the loader's device set to ``meta`` (a device that has shapes but no data), any operation that
    still gets a CPU tensor would, on a GPU, either fail or copy behind our back; this finds all of them
    on a machine without a GPU. ``copy_`` is the explicit move itself and is allowed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        devices = {t.device.type for t in tensors}
        self.devices |= devices
        if len(devices) > 1 and func is not torch.ops.aten.copy_.default:
            self.mixed.append(f"{func}: {sorted(devices)}")
        return func(*args, **kwargs)


def test_on_another_device_batches_are_built_there_from_the_same_random_numbers(train_set):
    augment = TensorAugment(pad=2, flip=True, color_jitter=0.1, erasing_p=1.0, channels_last=True)
    sampler = PKSampler(train_set.targets, p=3, k=2, seed=0)
    on_cpu = CachedLoader(train_set, 6, augment, sampler=sampler, generator=torch.Generator().manual_seed(4))
    assert on_cpu.device == torch.device("cpu") and on_cpu.images is train_set.images  # no copy on the CPU
    cpu_images, cpu_labels = next(iter(on_cpu))
    explicit = CachedLoader(train_set, 6, augment, sampler=sampler, generator=torch.Generator().manual_seed(4),
                            device="cpu")  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(next(iter(explicit)), (cpu_images, cpu_labels), strict=True))

    mode = DeviceMixing()
    with mode:
        elsewhere = CachedLoader(train_set, 6, augment, sampler=sampler, generator=torch.Generator().manual_seed(4),
                                 device="meta")  # fmt: skip
        images, labels = next(iter(elsewhere))
    assert mode.mixed == [] and "meta" in mode.devices
    assert elsewhere.images.device.type == "meta" and train_set.images.device.type == "cpu"  # cache copied once
    assert images.device.type == labels.device.type == "meta"
    assert images.shape == cpu_images.shape and images.dtype == torch.float32 and labels.shape == cpu_labels.shape
    assert images.is_contiguous(memory_format=torch.channels_last)
    # the same draws, from the same CPU generator: the same crops, flips and boxes on any device
    assert torch.equal(elsewhere.generator.get_state(), on_cpu.generator.get_state())


def test_evaluation_loader_on_another_device(prepared):
    mode = DeviceMixing()
    with mode:
        loader = cached_evaluation_loader(prepared / "query", H, W, batch_size=4, device="meta")
        images, labels = next(iter(loader))
    assert mode.mixed == [] and images.device.type == "meta" and labels.device.type == "meta"


# --------------------------------------------------------------------------- several processes (torchrun)


def test_sharded_loaders_split_each_epoch_and_augment_differently(prepared):
    shards = [build_cached_loaders(prepared, 4, height=H, width=W, shard=(rank, 2))[0]["train"] for rank in (0, 1)]
    n = len(shards[0].dataset)
    for epoch in (0, 1):
        indices = []
        for loader in shards:
            loader.sampler.set_epoch(epoch)
            indices.append(list(loader.sampler))
            labels = torch.cat([labels for _, labels in loader])
            assert torch.equal(labels, loader.dataset.targets[indices[-1]])  # the loader follows its shard
        # DistributedSampler: the two halves of one shuffled order (at most one image repeated to even them out)
        assert len(indices[0]) == len(indices[1]) == math.ceil(n / 2)
        assert set(indices[0]) | set(indices[1]) == set(range(n)) and len(set(indices[0]) & set(indices[1])) <= n % 2
    assert shards[0].seed != shards[1].seed  # each process augments with its own random numbers
    images = [next(iter(loader))[0] for loader in shards]
    assert not torch.equal(images[0], images[1])
    single = build_cached_loaders(prepared, 4, height=H, width=W)[0]["train"]
    assert isinstance(single.sampler, EpochShuffle) and single.seed == 0  # one process: all images, reshuffled
    pk = [build_cached_loaders(prepared, 4, height=H, width=W, instances=2, shard=(r, 2))[0]["train"] for r in (0, 1)]
    assert [s.sampler.rank for s in pk] == [0, 1] and len(pk[0]) == len(pk[1]) > 0


# --------------------------------------------------------------------------- one builder, two backends


def test_the_fast_backend_gives_what_the_classic_one_gives(prepared):
    for train_all in (False, True):
        classic, classic_sizes, classic_names = build_dataloaders(prepared, 8, train_all, H, W, backend=ClassicData(0))
        cached, sizes, names = build_cached_loaders(prepared, 8, train_all, H, W)
        assert sizes == classic_sizes and names == classic_names
        assert len(cached["train"]) == len(classic["train"]) and len(cached["train"].dataset) == sizes["train"]
    # the validation phase has no randomness: the very same batches
    for (classic_x, classic_y), (x, y) in zip(classic["val"], cached["val"], strict=True):
        assert torch.equal(classic_y, y) and torch.allclose(classic_x, x, atol=1e-6)
    pk, _, _ = build_cached_loaders(prepared, 8, height=H, width=W, instances=2)
    assert isinstance(pk["train"].sampler, PKSampler) and pk["train"].sampler.k == 2


def test_unprepared_folder_and_bad_options_fail_clearly(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a prepared folder"):
        build_cached_loaders(tmp_path, 8, height=H, width=W)
    with pytest.raises(ValueError, match="erasing_p"):
        build_cached_loaders(prepared, 8, height=H, width=W, erasing_p=1.5)
    with pytest.raises(FileNotFoundError, match="not found"):
        cached_evaluation_loader(tmp_path / "query", H, W)


def test_feature_extraction_from_the_cache_matches_the_dataloader(prepared):
    from reid_utils.model import ReIDNet
    from reid_utils.test import evaluation_loader, extract_features

    torch.manual_seed(0)
    model = ReIDNet(6, "resnet18", pretrained=False, quiet=True).eval()
    classic = extract_features(model, evaluation_loader(prepared / "query", H, W, backend=ClassicData(0)))
    cached = extract_features(model, cached_evaluation_loader(prepared / "query", H, W))
    assert classic.paths == cached.paths and np.array_equal(classic.pids, cached.pids)
    assert torch.allclose(classic.features, cached.features, atol=1e-5)
    assert math.isclose(float(cached.features.norm(dim=1).mean()), 1.0, rel_tol=1e-5)
