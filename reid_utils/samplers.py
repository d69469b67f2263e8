"""P x K batch sampling for metric learning.

A triplet loss needs positives: other images of the anchor's identity *in the same batch*. A shuffled
loader over a re-ID training set (751 identities in Market-1501, about 17 images each) almost never
puts two images of one person together. Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for
Person Re-Identification", 2017, therefore build each batch from P random identities with K random
images each; Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-identification",
CVPRW 2019, use P=16, K=4 (batch size 64).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler, Sampler


class PKSampler(Sampler[int]):
    """Dataset indices in P x K batches: ``DataLoader(ds, batch_size=sampler.batch_size, sampler=sampler)``.

    One epoch uses (almost) every image once: each identity's images are shuffled and cut into
    chunks of ``k`` (an identity with fewer than ``k`` images, or a remainder, is topped up *with
    replacement* -- repeated images still give useful, if easy, positives). Then, while at least
    ``p`` identities have chunks left, ``p`` of them are drawn at random (weighted by the chunks they
    have left) and give one chunk each:
    one batch of ``p`` distinct identities x ``k`` images. The few chunks that cannot fill a batch
    of distinct identities are left for the next epoch's shuffle, so every batch is full.

    Shuffling uses a ``torch.Generator`` seeded with ``seed + epoch`` (the ``DistributedSampler``
    convention), so a run is reproducible. As with ``DistributedSampler``, call ``set_epoch(epoch)``
    before each epoch, otherwise every epoch repeats the same batches.

    ``labels`` is one integer identity per dataset item, e.g. ``ImageFolder.targets``. Note that ``k=1``
    gives batches without positives, for which the triplet loss is undefined.

    ``shard=(rank, world)`` splits every epoch between ``world`` processes (``torchrun``): all of them draw
    the same batches (same seed), drop the few that would make the count uneven, and process ``rank``
    keeps batches ``rank, rank + world, ...`` -- whole P x K batches, disjoint between processes.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        p: int = 16,
        k: int = 4,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"p (identities per batch) and k (images per identity) must be >= 1, got p={p}, k={k}")
        label_tensor = torch.as_tensor(labels)
        if label_tensor.dim() != 1 or label_tensor.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(label_tensor.shape)}")
        if label_tensor.is_floating_point() or label_tensor.is_complex():
            raise ValueError(f"labels must be integers, got dtype {label_tensor.dtype}")
        # Group dataset indices by identity: a stable sort keeps each identity's indices in dataset order.
        order = torch.argsort(label_tensor, stable=True)
        _, counts = torch.unique_consecutive(label_tensor[order], return_counts=True)
        self.index_groups: list[torch.Tensor] = list(torch.split(order, counts.tolist()))
        if p > len(self.index_groups):
            raise ValueError(
                f"p={p} identities per batch, but the labels hold only {len(self.index_groups)} identities"
            )
        rank, world = shard
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard=(rank, world) needs 0 <= rank < world, got {shard}")
        self.p = p
        self.k = k
        self.seed = seed
        self.rank, self.world = rank, world
        self.epoch = 0

    @property
    def num_identities(self) -> int:
        return len(self.index_groups)

    @property
    def batch_size(self) -> int:
        """``p * k``: pass it to the ``DataLoader`` so its batches line up with the identity groups."""
        return self.p * self.k

    @property
    def num_batches(self) -> int:
        return len(self._batches())

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` produces (a different shuffle per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def _chunks(self, group: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """One identity's images, shuffled, in chunks of ``k``; the last chunk topped up with repeats."""
        shuffled = group[torch.randperm(len(group), generator=generator)]
        missing = -len(group) % self.k
        if missing:
            extra = group[torch.randint(len(group), (missing,), generator=generator)]
            shuffled = torch.cat([shuffled, extra])
        return list(torch.split(shuffled, self.k))

    def _batches(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chunks = [self._chunks(group, generator) for group in self.index_groups]
        available = [i for i, c in enumerate(chunks) if c]
        batches = []
        while len(available) >= self.p:
            # identities with more chunks left are drawn more often, so few chunks are left over at the end
            weights = torch.tensor([len(chunks[i]) for i in available], dtype=torch.float)
            picks = torch.multinomial(weights, self.p, replacement=False, generator=generator)
            chosen = [available[j] for j in picks.tolist()]
            batches.append(torch.cat([chunks[i].pop() for i in chosen]))
            available = [i for i in available if chunks[i]]
        usable = len(batches) // self.world * self.world  # every process gets the same number of batches
        return batches[self.rank : usable : self.world]

    def __iter__(self) -> Iterator[int]:
        batches = self._batches()
        if batches:
            yield from torch.cat(batches).tolist()


class EpochShuffle(Sampler[int]):
    """A new random order of ``n`` items every epoch, decided by ``seed + epoch`` alone.

    The convention of ``DistributedSampler``, for one process: the order of an epoch does not depend on how
    many epochs came before in *this* process, so a resumed run shuffles exactly as the uninterrupted one.
    Call ``set_epoch(epoch)`` before each epoch.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=generator).tolist()


def training_sampler(
    dataset: Sized,
    labels: Sequence[int] | torch.Tensor,
    batch_size: int,
    instances: int = 0,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Sampler[int]:
    """The order of the training images, shared by the classic and the cached loaders.

    P x K batches (``batch_size // instances`` identities x ``instances`` images) when ``instances > 0``; else,
    under several processes (``shard=(rank, world)``), this process's part of one shuffled order
    (``DistributedSampler``); else a shuffle of all images (``EpochShuffle``). Each decides an epoch's order
    from ``seed`` and the epoch alone (call ``set_epoch``), which makes resumed runs exact.
    """
    if instances > 0:
        people = len(torch.as_tensor(labels).unique())
        if batch_size // instances > people:  # said in the command line's words, with the batch that fits
            fits = people * instances
            raise ValueError(
                f"--batchsize {batch_size} with --instances {instances} asks for {batch_size // instances} identities "
                f"per batch, but the training set has {people}: use --batchsize {fits} or less (a multiple of "
                f"--instances), or train on more identities."
            )
        return PKSampler(labels, batch_size // instances, instances, seed=seed, shard=shard)
    rank, world = shard
    if world > 1:
        return DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    return EpochShuffle(len(dataset), seed)
