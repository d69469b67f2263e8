"""A faster CPU data path: decode every image once, then augment whole batches as tensors.

The classic loop (``reid_utils.data.build_dataloaders``) does, for *every image of every epoch*::

    open the JPEG -> decode -> bicubic resize -> pad -> random crop -> flip [-> jitter] -> to float -> normalise

in Python, one image at a time: about 0.3 ms per image on one core, 9-10 ms for a batch of 32 at 64x32.
Decoding and resizing give the same pixels every epoch, so this module does them once
(``CachedImageFolder``) and keeps the result in memory as one ``uint8`` tensor of shape ``N x 3 x H x W``.
The random part -- crop, flip, colour jitter, random erasing -- is then applied to a whole batch at once
with tensor operations (``TensorAugment``): about 0.25 ms for the same batch (1.2 ms with jitter and
erasing). ``CachedLoader`` hands out batches with the interface of a ``DataLoader`` (``for images, labels
in loader``, ``len(loader)``, ``loader.dataset``, ``loader.generator``, ``loader.sampler``), and
``CachedData`` is the backend that makes ``reid_utils.data.build_dataloaders`` build them.

How much faster training gets depends on how much of a step the data took (Amdahl's law): with ResNet-18
at 64x32 on 2 CPU cores the model's forward, backward and SGD step take ~70 ms per batch, so saving ~9 ms of
data time makes training about 1.1-1.2x faster, while feature extraction (a lighter step) gains ~1.25x.
``benchmarks/bench_train.py`` measures it.

Memory: one image costs ``3 * H * W`` bytes. Market-1501's 12,936 training crops take about 1.3 GB at
256x128 and about 320 MB at 128x64 (80 MB at the 64x32 demo size). Images are kept as ``uint8``, four
times smaller than ``float32``; conversion to float happens per batch. Decoding them all takes a few
seconds (PIL, in a few threads), once per run.

What stays the same: the decoded, resized pixels are exactly those of ``transforms.Resize`` on the PIL
image (same PIL call), and without augmentation a batch equals ``ToTensor`` + ``Normalize`` bit for bit.
What differs (within noise): the random numbers themselves (one ``torch.Generator`` drives everything,
which makes a run reproducible and resumable), and colour jitter, which works on float tensors like
torchvision's tensor ``ColorJitter`` rather than on 8-bit PIL images.

On a GPU (``CachedLoader(..., device="cuda")``, what ``--fast_data`` does when training on a GPU) the uint8
cache is copied to the GPU once -- 1.3 GB for Market-1501 at 256x128 -- and every batch is gathered and
augmented there: no decoding, no worker processes, no host-to-device copy of images. The random numbers
are still drawn on the CPU from the loader's generator (a few hundred per batch) and moved to the GPU, so
a run draws the same numbers, and makes the same crops, flips and boxes, on any device, and its
generator state resumes it exactly.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

from reid_utils.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    check_transform_options,
    default_pad,
    derived_seed,
    read_image,
    report_skipped,
)

# torchvision's RandomErasing defaults: the box covers 2-33 % of the image, height/width between 0.3 and 3.3.
ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)
ERASING_ATTEMPTS = 10  # like torchvision: give up (leave the image alone) after 10 boxes that do not fit
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


# --------------------------------------------------------------------------- decode once


def decode_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """One image as ``ImageFolder`` + ``transforms.Resize((height, width), BICUBIC)`` see it: ``H x W x 3`` uint8.

    The very same calls as the classic path (its loader ``read_image``, then the functional resize on
    the PIL image), so the cache holds exactly the pixels the classic transforms start from.
    """
    image = read_image(str(path))
    image = TF.resize(image, [height, width], interpolation=transforms.InterpolationMode.BICUBIC)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns about read-only arrays


def _default_threads() -> int:
    # PIL releases the GIL while it decodes and resizes, so threads do run in parallel; more than the
    # cores only adds switching.
    return max(1, min(4, os.cpu_count() or 1))


class CachedImageFolder(Dataset):
    """An ``ImageFolder`` whose images are decoded and resized once, into one ``N x 3 x H x W`` uint8 tensor.

    The folder is listed by ``torchvision.datasets.ImageFolder`` itself, so ``classes``, ``class_to_idx``,
    ``samples`` (``(path, class_index)`` pairs) and the order of the images are exactly those of the
    classic dataset; ``targets`` is the class index of every image as an int64 tensor.

    An unreadable image stops with the classic path's error naming the file; ``skip_corrupt`` leaves such
    images out instead, with the same one-line notice. ``num_threads`` decode in parallel (PIL releases the
    GIL); the default uses up to 4 cores. ``transform`` is what ``CachedLoader`` applies to its batches
    (default: normalisation only). ``build_seconds`` says how long decoding took.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        height: int = 256,
        width: int = 128,
        num_threads: int | None = None,
        skip_corrupt: bool = False,
        transform: TensorAugment | None = None,
    ) -> None:
        started = time.perf_counter()
        self.root = Path(root)
        listing = datasets.ImageFolder(str(self.root))  # lists the files only; nothing is decoded here
        self.classes: list[str] = listing.classes
        self.class_to_idx: dict[str, int] = listing.class_to_idx
        self.samples: list[tuple[str, int]] = list(listing.samples)
        self.height, self.width = height, width
        self.transform = transform if transform is not None else TensorAugment()
        self.images: torch.Tensor = self._decode_all(num_threads or _default_threads(), skip_corrupt)
        self.targets = torch.tensor([target for _, target in self.samples], dtype=torch.int64)
        self.build_seconds = time.perf_counter() - started

    # ----------------------------------------------------------------- the Dataset interface

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One ``3 x H x W`` uint8 image and its class index (use ``TensorAugment`` to make a model input)."""
        return self.images[index], int(self.targets[index])

    @property
    def nbytes(self) -> int:
        """Memory the decoded images take: ``N * 3 * H * W`` bytes."""
        return self.images.numel() * self.images.element_size()

    def __repr__(self) -> str:
        return (
            f"CachedImageFolder({str(self.root)!r}, {len(self)} images of {self.height}x{self.width}, "
            f"{len(self.classes)} classes, {self.nbytes / 2**20:.1f} MiB)"
        )

    # ----------------------------------------------------------------- decoding

    def _decode_all(self, num_threads: int, skip_corrupt: bool) -> torch.Tensor:
        images = torch.empty((len(self.samples), 3, self.height, self.width), dtype=torch.uint8)

        def decode_into(index: int) -> str | None:
            """Decode one image into its row; the path of an unreadable one when skipping them."""
            try:
                pixels = decode_image(self.samples[index][0], self.height, self.width)  # H x W x 3
            except CorruptImageError:
                if skip_corrupt:
                    return self.samples[index][0]
                raise
            images[index] = torch.from_numpy(pixels).permute(2, 0, 1)  # each thread writes its own rows
            return None

        if num_threads <= 1 or len(self.samples) < 2:
            broken = [decode_into(index) for index in range(len(self.samples))]
        else:
            with ThreadPoolExecutor(max_workers=num_threads) as pool:
                broken = list(pool.map(decode_into, range(len(self.samples))))  # re-raises a decoding error here
        broken_paths = [path for path in broken if path is not None]
        if broken_paths:
            keep = [i for i, path in enumerate(broken) if path is None]
            self.samples = [self.samples[i] for i in keep]
            images = images[keep]
            report_skipped(self.root, broken_paths)
        return images


# --------------------------------------------------------------------------- batched augmentation


def _grey(images: torch.Tensor) -> torch.Tensor:
    """``B x 1 x H x W`` luma of ``B x 3 x H x W`` images in [0, 1]."""
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


class TensorAugment:
    """The classic training transforms, applied to a whole ``B x 3 x H x W`` uint8 batch at once.

    In the order of ``reid_utils.data.build_transforms``: zero padding (``transforms.Pad``: black pixels) and
    a random ``H x W`` crop, i.e. a shift of up to ``pad`` pixels, drawn per image; a horizontal flip of
    each image with probability 1/2; optional colour jitter (brightness, contrast and saturation factors
    drawn per image in ``[1 - s, 1 + s]``, applied in a random order per image, as ``ColorJitter`` does);
    conversion to float in [0, 1] and ImageNet normalisation; optional random erasing of one box per image
    with probability ``erasing_p`` (torchvision's defaults: 2-33 % of the area, aspect 0.3-3.3, value 0).

    No Python loop runs over the images: crop and flip are one ``gather`` with a per-image index grid, and
    the erasing boxes are boolean masks built by broadcasting. Every random number comes from the
    ``generator`` passed to the call, so the same generator state gives the same batch.

    The batch may live on any device (CPU or GPU): the work happens where the images are. The random
    numbers are drawn on the CPU (``generator`` is a CPU generator) and moved to the images' device, so
    the same generator state gives the same crops, flips, jitter factors and boxes on every device.

    With the defaults (``pad=0``, no flip, no jitter, no erasing) this is the evaluation transform, and equals
    ``ToTensor()`` + ``Normalize`` exactly. ``channels_last`` returns the batch in that memory format (use it
    with ``model.to(memory_format=torch.channels_last)``): on our 2-core CPU it made ResNet-50 at 256x128 about
    1.5x faster, but ResNet-18 at 64x32 about 8 % slower -- measure before switching it on.
    """

    def __init__(
        self,
        pad: int = 0,
        flip: bool = False,
        color_jitter: float = 0.0,
        erasing_p: float = 0.0,
        channels_last: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}.")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter is a strength in [0, 1), got {color_jitter}.")
        if not 0.0 <= erasing_p <= 1.0:
            raise ValueError(f"erasing_p must be between 0 and 1, got {erasing_p}.")
        self.pad = pad
        self.flip = flip
        self.color_jitter = color_jitter
        self.erasing_p = erasing_p
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean and std, moved once

    def __repr__(self) -> str:
        return (
            f"TensorAugment(pad={self.pad}, flip={self.flip}, color_jitter={self.color_jitter}, "
            f"erasing_p={self.erasing_p}, channels_last={self.channels_last})"
        )

    @property
    def random(self) -> bool:
        """Whether this transform draws random numbers (the evaluation transform does not)."""
        return self.pad > 0 or self.flip or self.color_jitter > 0 or self.erasing_p > 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` uint8 -> ``B x 3 x H x W`` float32, augmented and normalised."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.size(1) != 3:
            raise ValueError(
                f"TensorAugment takes a B x 3 x H x W uint8 batch, got {images.dtype} of shape {tuple(images.shape)}."
            )
        if self.pad > 0 or self.flip:
            images = self.crop_and_flip(images, generator)
        # ToTensor: the same two steps (to float, divide by 255), so without augmentation the result is exact.
        batch = images.float().div_(255)
        if self.color_jitter > 0:
            batch = self.jitter(batch, generator)
        mean, std = self.statistics(batch.device)
        batch = batch.sub_(mean).div_(std)  # Normalize, in the same order of operations
        if self.erasing_p > 0:
            batch = self.erase(batch, generator)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` on ``device`` (copied there on first use, then reused)."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def crop_and_flip(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Zero-pad, then take a random ``H x W`` window of every image, mirrored with probability 1/2.

        Instead of slicing image by image, build for each image the flat index of every output pixel in
        the padded image -- row ``top + y``, column ``left + x`` (or ``left + W - 1 - x`` when flipped) --
        and fetch them all with one ``gather``.
        """
        b, c, h, w = images.shape
        device = images.device
        p = self.pad
        padded = F.pad(images, (p, p, p, p)) if p > 0 else images  # constant 0, like transforms.Pad
        padded_w = w + 2 * p
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(device)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(device)
        cols = torch.arange(w, device=device).expand(b, w)
        if self.flip:
            mirrored = (torch.rand(b, generator=generator) < 0.5).to(device)
            cols = torch.where(mirrored[:, None], w - 1 - cols, cols)
        rows = torch.arange(h, device=device)[None, :] + top[:, None]  # B x H
        cols = cols + left[:, None]  # B x W
        index = (rows[:, :, None] * padded_w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)

    def jitter(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Brightness, contrast and saturation, each with its own factor per image, in a random order per image.

        All three are the same operation, a blend ``f * image + (1 - f) * reference`` clipped to [0, 1]
        (that is how torchvision implements them); only the reference differs: black for brightness, the
        image's mean grey level for contrast, its grey version for saturation. So each of the three rounds
        picks, per image, the reference and the factor its random order names for that round, and blends
        the whole batch at once with ``torch.lerp`` (``reference + f * (image - reference)``).
        """
        b = batch.size(0)
        s = self.color_jitter
        factors = torch.empty(b, 3).uniform_(1 - s, 1 + s, generator=generator)  # brightness, contrast, saturation
        order = torch.rand(b, 3, generator=generator).argsort(dim=1)  # a random permutation of (0, 1, 2) per image
        return self.blend_in_order(batch, factors.to(batch.device), order.to(batch.device))

    @staticmethod
    def blend_in_order(batch: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The deterministic part of ``jitter``: ``factors`` and ``order`` are ``B x 3`` (columns: brightness,
        contrast, saturation; ``order[i]`` a permutation of 0, 1, 2)."""
        b = batch.size(0)
        for step in range(3):
            which = order[:, step].view(b, 1, 1, 1)
            grey = _grey(batch)  # B x 1 x H x W
            mean_grey = grey.mean(dim=(2, 3), keepdim=True)  # B x 1 x 1 x 1
            reference = torch.where(which == 0, 0.0, torch.where(which == 1, mean_grey, grey))
            factor = factors.gather(1, order[:, step : step + 1]).view(b, 1, 1, 1)
            batch = torch.lerp(reference, batch, factor).clamp_(0, 1)
        return batch

    def erase(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random erasing (Zhong et al., AAAI 2020) of one box per image, with probability ``erasing_p``.

        torchvision tries up to 10 random boxes until one fits inside the image; here all 10 are drawn at
        once for every image and the first that fits is kept (an image where none fits is left alone, as
        there). The boxes become one ``B x H x W`` mask by comparing row and column numbers with each box.
        The boxes are worked out on the CPU (a few numbers per image); only the mask is built on the device.
        """
        b, _, h, w = batch.shape
        apply = torch.rand(b, generator=generator) < self.erasing_p
        area = h * w * torch.empty(b, ERASING_ATTEMPTS).uniform_(*ERASING_SCALE, generator=generator)
        log_ratio = torch.empty(b, ERASING_ATTEMPTS).uniform_(
            math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1]), generator=generator
        )
        aspect = log_ratio.exp()
        box_h = (area * aspect).sqrt().round().long()
        box_w = (area / aspect).sqrt().round().long()
        fits = (box_h < h) & (box_w < w)
        first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
        apply &= fits.any(dim=1)
        box_h = torch.where(apply, box_h.gather(1, first).squeeze(1), 0)
        box_w = torch.where(apply, box_w.gather(1, first).squeeze(1), 0)
        top = (torch.rand(b, generator=generator) * (h - box_h + 1)).long()  # uniform in 0 .. h - box_h
        left = (torch.rand(b, generator=generator) * (w - box_w + 1)).long()
        top, left, box_h, box_w = (v.to(batch.device) for v in (top, left, box_h, box_w))
        rows, cols = torch.arange(h, device=batch.device)[None, :], torch.arange(w, device=batch.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # B x H
        in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # B x W
        mask = in_rows[:, :, None] & in_cols[:, None, :]  # B x H x W; empty where box_h = 0
        return batch.masked_fill_(mask[:, None], 0.0)  # 0 = the mean colour after normalisation


def build_tensor_transforms(
    height: int = 256,
    width: int = 128,
    erasing_p: float = 0.0,
    color_jitter: bool = False,
    pad: int | None = None,
    channels_last: bool = False,
) -> dict[str, TensorAugment]:
    """The batched counterparts of ``reid_utils.data.build_transforms``: ``train`` augments, ``val`` normalises.

    The resize is not here: ``CachedImageFolder`` already stores the images at ``height x width``.
    """
    check_transform_options(height, width, erasing_p)
    pad = default_pad(height) if pad is None else pad
    jitter = 0.1 if color_jitter else 0.0  # the recipe's brightness = contrast = saturation = 0.1
    return {
        "train": TensorAugment(pad, True, jitter, erasing_p, channels_last),
        "val": TensorAugment(channels_last=channels_last),
    }


# --------------------------------------------------------------------------- the loader


class CachedLoader:
    """Batches ``(images, labels)`` of a ``CachedImageFolder``, with the parts of the ``DataLoader`` API the
    trainer uses.

    Order: ``sampler`` when given (e.g. ``PKSampler``: its indices are cut into batches of ``batch_size``),
    else a fresh permutation per epoch when ``shuffle``, else dataset order. Batches are cut in that order;
    the last one may be short (no ``drop_last``: the trainer skips short training batches itself).
    ``len(loader)`` is the number of batches and ``loader.dataset`` the cached folder.

    ``generator`` drives the shuffle *and* every random number of the augmentation, so the same generator
    state replays the same batches. With ``seed`` (what the trainer uses) the generator is seeded afresh at
    the start of every epoch from ``(seed, sampler.epoch)``: an epoch's batches then depend on the epoch
    alone, and a resumed run needs no saved loader state. Everything runs in the main process: with the decoding
    gone, a batch takes well under a millisecond to assemble, and worker processes would cost more than
    they save (on 2 cores they would also compete with the model for the CPU).

    ``transform`` defaults to the dataset's own (the evaluation transform, normalisation only, unless it
    was made with another).

    ``device`` (default: where the cache is, the CPU) is where batches are assembled and augmented. With
    ``device="cuda"`` the loader copies the uint8 images to the GPU once, at construction, and then
    yields batches that are already there (images and labels): the GPU fast path.
    """

    def __init__(
        self,
        dataset: CachedImageFolder,
        batch_size: int = 32,
        transform: TensorAugment | None = None,
        shuffle: bool = False,
        sampler: Sampler[int] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if shuffle and sampler is not None:
            raise ValueError(
                "sampler and shuffle are mutually exclusive (as in DataLoader): the sampler sets the order."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        if transform is None:
            transform = getattr(dataset, "transform", None) or TensorAugment()
        self.transform = transform
        self.shuffle = shuffle
        self.sampler = sampler
        self.generator = generator
        self.seed = seed
        self.drop_last = False
        self.device = torch.device(device) if device is not None else dataset.images.device
        # One copy to the device, now; on the CPU .to() returns the cache itself (no copy).
        self.images = dataset.images.to(self.device)
        self.targets = dataset.targets.to(self.device)

    def __len__(self) -> int:
        items = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return math.ceil(items / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The dataset indices of the next epoch, in order (draws from ``generator`` when shuffling)."""
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler), dtype=torch.int64)
        if self.shuffle:
            return torch.randperm(len(self.dataset), generator=self.generator)
        return torch.arange(len(self.dataset))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.seed is not None:  # every epoch's random numbers from (seed, epoch): resumable without saved state
            epoch = getattr(self.sampler, "epoch", 0)
            self.generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        order = self.epoch_order()
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size].to(self.device)
            images = self.images.index_select(0, index)  # B x 3 x H x W uint8, one copy
            labels = self.targets.index_select(0, index)
            yield self.transform(images, self.generator), labels


# --------------------------------------------------------------------------- the backend


class CachedData:
    """The fast data path as a backend of ``reid_utils.data.build_dataloaders``: cached images, batched augmentation.

    ``build_dataloaders(..., backend=CachedData())`` gives the classic builder's loaders, folders, checks,
    samplers and errors, with ``CachedImageFolder`` datasets and ``CachedLoader`` loaders. ``device="cuda"``
    keeps the images on the GPU and augments there; ``channels_last`` hands out batches in that memory
    format; ``num_threads`` decode the images (``--num_workers`` of the trainer).
    """

    def __init__(
        self, channels_last: bool = False, device: torch.device | str | None = None, num_threads: int | None = None
    ) -> None:
        self.channels_last = channels_last
        self.device = device
        self.num_threads = num_threads

    def dataset(
        self, folder: Path, height: int, width: int, augment: bool = False, erasing_p: float = 0.0,
        color_jitter: bool = False, skip_corrupt: bool = False,
    ) -> CachedImageFolder:  # fmt: skip
        tfs = build_tensor_transforms(height, width, erasing_p, color_jitter, channels_last=self.channels_last)
        transform = tfs["train" if augment else "val"]
        return CachedImageFolder(folder, height, width, self.num_threads, skip_corrupt, transform)

    def loader(
        self, dataset: CachedImageFolder, batch_size: int, sampler: Sampler[int] | None = None,
        seed: int | None = None, persistent: bool = False,
    ) -> CachedLoader:  # fmt: skip
        return CachedLoader(dataset, batch_size, dataset.transform, sampler=sampler, device=self.device, seed=seed)
