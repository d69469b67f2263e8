"""Market-1501 names, where the data lives, the baseline transforms and the DataLoaders.

Everything here works the same on the real ``Market-1501-v15.09.15`` folder and on the
embedded synthetic set, because both use the same folder layout and the same file names.

``build_dataloaders`` builds the training loaders of the classic ``train.py`` (``ImageFolder`` +
``DataLoader``). The same builder drives the faster data path of ``reid_utils.fastdata``: it is
handed another *backend*, an object that makes the datasets and loaders the same way.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms

from reid_utils import synthetic
from reid_utils.files import one_at_a_time
from reid_utils.samplers import training_sampler

# ImageNet statistics: the backbone was pre-trained on images normalised this way.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MARKET_FOLDERS = ("bounding_box_train", "bounding_box_test", "query")
MARKET_ENV_VAR = "MARKET1501_DIR"
FORCE_ENV_VAR = "REID_DATASET"  # "synthetic" skips the search
MARKET_FOLDER_NAMES = ("Market-1501-v15.09.15", "Market-1501")
SYNTHETIC_FOLDER_NAME = "synthetic-market"
PREPARED_MARKER = "PREPARED.json"  # written by reid_utils.prepare into every tree it builds

# 0002_c1s1_000451_03.jpg -> pid 0002, camera 1, sequence 1, frame 000451, box 03.
# Junk boxes use the pid -1 ("-1_c3s2_012345_02.jpg"); distractors use 0000.
_MARKET_NAME = re.compile(r"^(?P<pid>-1|\d{4})_c(?P<cam>\d)s(?P<seq>\d)_(?P<frame>\d{6})_(?P<box>\d{2})\.jpg$")


class MarketNameError(ValueError):
    """A file name that does not follow the Market-1501 pattern."""


class MarketName(NamedTuple):
    pid: int  # -1 = junk, 0 = distractor, otherwise a person
    camera: int
    sequence: int
    frame: int
    box: int


def parse_market_name(name: str | os.PathLike) -> MarketName:
    """Decode a Market-1501 file name; the identity and camera are all evaluation needs."""
    base = Path(name).name
    match = _MARKET_NAME.match(base)
    if match is None:
        raise MarketNameError(
            f"'{base}' is not a Market-1501 file name: expected PPPP_cCsS_FFFFFF_BB.jpg "
            f"(for example 0002_c1s1_000451_03.jpg)."
        )
    return MarketName(
        pid=int(match["pid"]),
        camera=int(match["cam"]),
        sequence=int(match["seq"]),
        frame=int(match["frame"]),
        box=int(match["box"]),
    )


# --------------------------------------------------------------------------- where the data is


def repo_root() -> Path:
    """The checkout this package was installed from (editable install), else the working directory."""
    candidate = Path(__file__).resolve().parents[1]
    if (candidate / "pyproject.toml").is_file() and (candidate / "reid_utils").is_dir():
        return candidate
    return Path.cwd()


def default_data_root() -> Path:
    return repo_root() / "data"


def display_path(path: str | os.PathLike) -> str:
    """A path as a learner should read it: relative to the checkout when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(repo_root()).as_posix()
    except ValueError:
        return str(path)


def is_market_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return all((path / sub).is_dir() for sub in MARKET_FOLDERS)


@dataclass(frozen=True)
class DatasetLocation:
    path: Path
    synthetic: bool


def find_dataset(
    data_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    quiet: bool = False,
) -> DatasetLocation:
    """Find Market-1501: the argument, then ``$MARKET1501_DIR``, then ``data/``; else the synthetic set.

    ``REID_DATASET=synthetic`` (set by the tests) skips the search and uses the synthetic set.
    An explicit ``data_dir`` that is not a Market folder is an error (the user asked for it),
    while a missing dataset in the default places falls back to the embedded synthetic set,
    generated on first use, with a one-line notice.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    if data_dir is None and os.environ.get(FORCE_ENV_VAR) == "synthetic":  # the tests: same data everywhere
        return _announce(DatasetLocation(ensure_synthetic(root / SYNTHETIC_FOLDER_NAME), synthetic=True), quiet)
    # What the user named explicitly must be right: an error, not a silent fallback.
    from_environment = os.environ.get(MARKET_ENV_VAR)
    explicit = [
        (data_dir, f"{data_dir}", "Point to the unzipped Market-1501-v15.09.15 folder."),
        (from_environment, f"${MARKET_ENV_VAR}={from_environment}", "Fix the variable or unset it."),
    ]
    for given, what, fix in explicit:
        if given:
            path = Path(given).expanduser()
            if not is_market_folder(path):
                raise FileNotFoundError(
                    f"{what} is not a Market-1501 folder: it needs {', '.join(MARKET_FOLDERS)}. {fix}"
                )
            return _announce(DatasetLocation(path, synthetic=False), quiet)
    for name in MARKET_FOLDER_NAMES:
        if is_market_folder(root / name):
            return _announce(DatasetLocation(root / name, synthetic=False), quiet)
    return _announce(DatasetLocation(ensure_synthetic(root / SYNTHETIC_FOLDER_NAME), synthetic=True), quiet)


def ensure_synthetic(path: str | os.PathLike) -> Path:
    """The default synthetic set at ``path``, generated only when missing or made with other settings."""
    path = Path(path)
    wanted = (0, synthetic.DEFAULT_TRAIN_IDS, synthetic.DEFAULT_TEST_IDS)

    def missing() -> bool:
        summary = synthetic.read_summary(path)
        return summary is None or (summary.seed, summary.train_ids, summary.test_ids) != wanted

    if missing():
        with one_at_a_time(path):  # two notebooks started at once: one draws the set, the other waits for it
            if missing():
                synthetic.generate_market(path, overwrite=True)
    return path


def _announce(location: DatasetLocation, quiet: bool) -> DatasetLocation:
    if not quiet:
        if location.synthetic:
            print(
                f"Market-1501 not found: using the embedded synthetic set in {display_path(location.path)} "
                f"(set ${MARKET_ENV_VAR} or unzip Market-1501 into data/ to use the real one)."
            )
        else:
            print(f"Using Market-1501 at {display_path(location.path)}")
    return location


# --------------------------------------------------------------------------- transforms


def check_transform_options(height: int, width: int, erasing_p: float) -> None:
    """Options both data paths reject before any image is touched."""
    if not 0.0 <= erasing_p <= 1.0:
        raise ValueError(f"erasing_p must be between 0 and 1, got {erasing_p}.")
    if height < 16 or width < 8:
        raise ValueError(f"input size {height}x{width} is too small; use at least 16x8.")


def default_pad(height: int) -> int:
    """The padding of the classic transforms: 10 pixels at 256x128, scaled with the height for smaller inputs."""
    return max(1, round(10 * height / 256))


def build_transforms(
    height: int = 256,
    width: int = 128,
    erasing_p: float = 0.0,
    color_jitter: bool = False,
    pad: int | None = None,
) -> dict[str, transforms.Compose]:
    """The classic baseline's transforms; ``val`` is also the test-time transform.

    Train: resize (bicubic) -> pad + random crop (small shifts) -> horizontal flip
    [-> colour jitter] -> tensor -> ImageNet normalisation [-> random erasing].
    Random erasing comes after normalisation so the erased box is filled with zeros,
    which is the mean colour of the normalised images. ``pad`` defaults to 10 pixels at
    256x128 and scales with the height for smaller demo inputs.
    """
    check_transform_options(height, width, erasing_p)
    if pad is None:
        pad = default_pad(height)
    size = (height, width)
    bicubic = transforms.InterpolationMode.BICUBIC
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = [
        transforms.Resize(size, interpolation=bicubic),
        transforms.Pad(pad),
        transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(),
    ]
    if color_jitter:
        train.append(transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0))
    train += [transforms.ToTensor(), normalise]
    if erasing_p > 0:
        train.append(transforms.RandomErasing(p=erasing_p, value=0))
    val = [transforms.Resize(size, interpolation=bicubic), transforms.ToTensor(), normalise]
    return {"train": transforms.Compose(train), "val": transforms.Compose(val)}


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation so a tensor can be shown as a picture (values in [0, 1])."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)


# --------------------------------------------------------------------------- datasets and loaders


class CorruptImageError(ValueError):
    """An image file that PIL cannot decode (truncated download, disk error, not an image)."""


def error_line(err: BaseException) -> str:
    """An error as one line. A DataLoader worker's error arrives wrapped with the worker's traceback:
    its last line is the original message."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def read_image(path: str) -> Image.Image:
    """``ImageFolder``'s loader, but a broken file is named in the error instead of failing deep in PIL."""
    try:
        with open(path, "rb") as file:
            image = Image.open(file)
            return image.convert("RGB")  # convert() decodes the whole image: truncation shows up here
    except Image.DecompressionBombError as err:  # Pillow's guard against images of billions of pixels
        raise CorruptImageError(f"{path} is too large to read ({err}). Shrink or delete it.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"{path} cannot be read as an image ({err}). Delete or replace it.") from None


def image_folder(folder: str | os.PathLike, transform, skip_corrupt: bool = False) -> datasets.ImageFolder:
    """``ImageFolder`` with ``read_image``; ``skip_corrupt`` decodes every file once and drops broken ones."""
    dataset = datasets.ImageFolder(str(folder), transform, loader=read_image)
    if skip_corrupt:
        broken = []
        for path, _ in dataset.samples:
            try:
                read_image(path)
            except CorruptImageError:
                broken.append(path)
        if broken:
            keep = [(path, target) for path, target in dataset.samples if path not in set(broken)]
            dataset.samples = dataset.imgs = keep
            dataset.targets = [target for _, target in keep]
            report_skipped(folder, broken)
    return dataset


def report_skipped(folder: str | os.PathLike, broken: list[str]) -> None:
    """One line naming the unreadable images that ``skip_corrupt`` left out."""
    names = ", ".join(Path(p).name for p in broken[:3]) + (" ..." if len(broken) > 3 else "")
    print(f"Skipped {len(broken)} unreadable image(s) in {display_path(folder)}: {names}")


def default_num_workers() -> int:
    """Worker processes for DataLoaders: none on small machines, where they cost more than they save.

    Workers re-import this package in each process (spawn on Windows and macOS), which is
    safe because the datasets and transforms are defined here and not in a notebook cell.
    """
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus - 1)


def check_prepared(data_dir: Path, train_all: bool) -> str:
    """The training folder's name, after checking the prepared layout is there (with the fix if not)."""
    train_folder = "train_all" if train_all else "train"
    for folder in (train_folder, "val"):
        if not (data_dir / folder).is_dir():
            raise FileNotFoundError(f"{data_dir / folder} not found: {not_prepared(data_dir)}")
    return train_folder


def read_prepared_marker(folder: str | os.PathLike) -> dict | None:
    """What ``PREPARED.json`` says about a tree ``reid_utils.prepare`` built (source, counts...), or None."""
    try:
        marker = json.loads((Path(folder) / PREPARED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def not_prepared(data_dir: Path, tool: str = "--data_dir") -> str:
    """Why ``data_dir`` is not a prepared folder, and the ``prepare`` command that makes one (it works as given).

    A Market-1501 folder as downloaded is prepared into ``<its parent>/prepared/<its name>``; a damaged tree
    that ``prepare`` made is rebuilt from the source its marker names; an empty or missing folder is filled.
    """
    command = "python -m reid_utils.prepare --src {src} --dst {dst}"
    if is_market_folder(data_dir):
        dst = data_dir.parent / "prepared" / data_dir.name
        run = command.format(src=data_dir, dst=dst)
        return (f"{data_dir} is a Market-1501 folder as downloaded, not a prepared one. Run `{run}` and pass "
                f"{tool} {dst}.")  # fmt: skip
    marker = read_prepared_marker(data_dir)
    if marker is not None and marker.get("source"):
        run = command.format(src=marker["source"], dst=data_dir)
        return f"{data_dir} is an incomplete prepared folder. Run `{run}` to rebuild it."
    if not data_dir.exists() or not any(data_dir.iterdir()):
        run = command.format(src="<Market-1501 folder>", dst=data_dir)
        return f"{data_dir} is not a prepared folder. Run `{run}` first."
    run = command.format(src="<Market-1501 folder>", dst="<a new folder>")
    return f"{data_dir} is not a prepared folder. Run `{run}` and pass {tool} <that folder>."


def check_test_folder(folder: Path) -> None:
    """A prepared ``query/`` or ``gallery/`` folder, or the ``prepare`` command that makes one."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: --data_dir {not_prepared(folder.parent)}")
    if is_market_folder(folder.parent):  # a raw Market folder has query/ too, without the identity sub-folders
        raise FileNotFoundError(f"{folder} is not prepared: --data_dir {not_prepared(folder.parent)}")


def derived_seed(*numbers: int) -> int:
    """One well-mixed seed from several numbers (run seed, epoch, image): independent random streams."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> 1)


class WithEpoch(Sampler):
    """Hands the dataset ``(index, epoch)`` keys instead of indices, for ``SeededSamples``."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((index, epoch) for index in self.sampler)


class SeededSamples(Dataset):
    """A dataset whose random transforms draw from a seed made of ``(seed, epoch, image index)``.

    torchvision's transforms draw from torch's global random generator. With ``DataLoader`` worker
    processes that generator is each worker's own, so an image's crop and flip would depend on which
    worker loaded it and on state no checkpoint can hold -- a resumed run would augment differently.
    Seeding every image from what it is makes the augmentation the same with 0, 2 or 8 workers, and
    resumable exactly. The global generator of the process is left as it was (``fork_rng``), so dropout
    draws the same numbers with and without workers. Only the CPU generator is seeded: the transforms draw
    from it alone, and ``torch.manual_seed`` would also re-seed the GPU's generator (which dropout on a GPU
    draws from) at every image.
    """

    def __init__(self, dataset: datasets.ImageFolder, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def targets(self) -> list[int]:
        return self.dataset.targets

    @property
    def samples(self) -> list[tuple[str, int]]:
        return self.dataset.samples


class DataBackend(Protocol):
    """How one data path makes datasets and loaders (``ClassicData`` here, ``fastdata.CachedData``)."""

    def dataset(
        self, folder: Path, height: int, width: int, augment: bool = False, erasing_p: float = 0.0,
        color_jitter: bool = False, skip_corrupt: bool = False,
    ): ...  # fmt: skip

    def loader(self, dataset, batch_size: int, sampler=None, seed: int | None = None, persistent: bool = False): ...


class ClassicData:
    """The classic data path: ``ImageFolder`` + ``DataLoader``; every image is decoded, resized and
    augmented again in every epoch, by ``num_workers`` worker processes (none on small machines)."""

    def __init__(self, num_workers: int | None = None) -> None:
        self.num_workers = default_num_workers() if num_workers is None else num_workers

    def dataset(
        self, folder: Path, height: int, width: int, augment: bool = False, erasing_p: float = 0.0,
        color_jitter: bool = False, skip_corrupt: bool = False,
    ) -> datasets.ImageFolder:  # fmt: skip
        transform = build_transforms(height, width, erasing_p, color_jitter)["train" if augment else "val"]
        return image_folder(folder, transform, skip_corrupt)

    def loader(
        self, dataset, batch_size: int, sampler=None, seed: int | None = None, persistent: bool = False
    ) -> torch.utils.data.DataLoader:
        """Batches in ``sampler``'s order (else dataset order); ``seed``: augment each image from its own seed."""
        if seed is not None:
            dataset, sampler = SeededSamples(dataset, seed), WithEpoch(sampler)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=persistent and torch.cuda.is_available(),
            persistent_workers=persistent and self.num_workers > 0,
            # its own generator: starting the workers must not draw from the global one (that dropout uses)
            generator=torch.Generator().manual_seed(0 if seed is None else seed),
        )


def check_identities(data_dir: Path, train_folder: str, train: list[str], val: list[str]) -> None:
    """At least two identities to tell apart, and no val identity the classifier never saw."""
    if len(train) < 2:
        raise ValueError(
            f"{data_dir / train_folder} holds a single identity ({train[0] if train else 'none'}): a classifier "
            f"over one class is always right and learns nothing. Re-ID training needs images of at least 2 people."
        )
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise ValueError(
            f"{data_dir / 'val'} holds identities that {train_folder}/ lacks ({', '.join(unknown[:3])}): "
            f"{not_prepared(data_dir)}"
        )


def use_classes(dataset, classes: list[str]) -> None:
    """Label ``dataset`` (classic or cached) with the class indices of ``classes``, a superset of its own.

    ``prepare`` leaves identities with a single training image out of ``val/`` (the one image trains), so
    ``val/`` may hold fewer identities than ``train/``; its labels must still be the training indices.
    """
    index = {name: i for i, name in enumerate(classes)}
    own = dataset.classes
    dataset.samples = [(path, index[own[target]]) for path, target in dataset.samples]
    targets = [target for _, target in dataset.samples]
    dataset.targets = torch.tensor(targets, dtype=torch.int64) if torch.is_tensor(dataset.targets) else targets
    if hasattr(dataset, "imgs"):
        dataset.imgs = dataset.samples
    dataset.classes, dataset.class_to_idx = list(classes), index


def build_dataloaders(
    data_dir: str | os.PathLike,
    batch_size: int = 32,
    train_all: bool = False,
    height: int = 256,
    width: int = 128,
    erasing_p: float = 0.0,
    color_jitter: bool = False,
    seed: int = 0,
    instances: int = 0,
    skip_corrupt: bool = False,
    shard: tuple[int, int] = (0, 1),
    backend: DataBackend | None = None,
) -> tuple[dict[str, torch.utils.data.DataLoader], dict[str, int], list[str]]:
    """Datasets and loaders for the ``train`` and ``val`` phases, as in the classic ``train.py``.

    With ``train_all`` the training phase reads ``train_all/`` (every training image);
    the validation images are then also seen in training, so val accuracy is optimistic.
    ``instances`` K > 0 samples training batches of ``batch_size // K`` identities x K images
    (the P x K sampling a triplet loss needs) instead of shuffling images. ``skip_corrupt`` leaves
    unreadable images out (with a notice) instead of stopping at the first one. ``shard=(rank, world)``
    gives each of ``world`` processes its own part of every training epoch (``DistributedSampler``).
    ``backend`` is the data path: ``ClassicData()`` by default, ``fastdata.CachedData()`` for the fast one.
    Returns the loaders, ``dataset_sizes`` and the class names (the person ids).
    """
    data_dir = Path(data_dir)
    train_folder = check_prepared(data_dir, train_all)
    check_transform_options(height, width, erasing_p)
    backend = ClassicData() if backend is None else backend
    image_datasets = {
        "train": backend.dataset(data_dir / train_folder, height, width, True, erasing_p, color_jitter, skip_corrupt),
        "val": backend.dataset(data_dir / "val", height, width, skip_corrupt=skip_corrupt),
    }
    check_identities(data_dir, train_folder, image_datasets["train"].classes, image_datasets["val"].classes)
    if image_datasets["val"].classes != image_datasets["train"].classes:  # identities of a single image
        use_classes(image_datasets["val"], image_datasets["train"].classes)
    train_set = image_datasets["train"]
    train_sampler = training_sampler(train_set, train_set.targets, batch_size, instances, seed, shard)
    loaders = {  # seed + rank: under torchrun each process augments its images with its own random numbers
        "train": backend.loader(train_set, batch_size, train_sampler, seed=seed + shard[0], persistent=True),
        "val": backend.loader(image_datasets["val"], batch_size, persistent=True),
    }
    dataset_sizes = {phase: len(image_datasets[phase]) for phase in ("train", "val")}
    return loaders, dataset_sizes, image_datasets["train"].classes
