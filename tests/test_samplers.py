"""Tests for reid_utils.samplers.PKSampler: batch structure, epoch coverage, determinism, DataLoader use."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reid_utils.samplers import PKSampler


def make_labels(counts: list[int]) -> list[int]:
    """Identity ``i`` gets ``counts[i]`` images, interleaved so one identity's indices are not contiguous."""
    labels = [i for i, count in enumerate(counts) for _ in range(count)]
    return labels[::2] + labels[1::2]


def batches(sampler: PKSampler) -> list[list[int]]:
    indices = list(sampler)
    size = sampler.batch_size
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_every_batch_has_p_identities_with_k_images_each():
    labels = make_labels([8, 4, 8, 4, 8, 8, 4, 8, 4, 8])  # multiples of k: no repeats needed
    sampler = PKSampler(labels, p=3, k=4, seed=1)
    assert len(sampler) == len(list(sampler)) > 0
    for batch in batches(sampler):
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        assert len(set(batch)) == len(batch)  # a chunk never repeats an image when there are enough


def test_one_epoch_uses_every_image_when_it_divides():
    labels = make_labels([6] * 12)  # 12 identities x 2 chunks of 3: 24 chunks, 6 batches of 4 distinct identities
    sampler = PKSampler(labels, p=4, k=3)
    indices = list(sampler)
    assert sorted(indices) == list(range(len(labels)))  # every image exactly once
    assert sampler.num_batches == 6 and len(sampler) == 72


def test_same_seed_and_epoch_repeat_different_epoch_or_seed_change():
    labels = make_labels([6] * 8)
    first, second = PKSampler(labels, p=2, k=4, seed=7), PKSampler(labels, p=2, k=4, seed=7)
    assert list(first) == list(second) == list(first)  # without set_epoch the order repeats
    order0 = list(first)
    first.set_epoch(1)
    assert list(first) != order0
    second.set_epoch(1)
    assert list(first) == list(second)
    assert list(PKSampler(labels, p=2, k=4, seed=8)) != order0


def test_small_identities_are_sampled_with_replacement():
    labels = [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]  # identity 0 has 2 images, fewer than k=4
    sampler = PKSampler(labels, p=3, k=4)
    indices = list(sampler)
    from_id0 = [i for i in indices if labels[i] == 0]
    assert len(from_id0) == 4 and set(from_id0) == {0, 1}  # both images, then repeats
    assert Counter(labels[i] for i in indices) == {0: 4, 1: 4, 2: 4}


def test_arbitrary_integer_labels_and_tensor_input():
    labels = torch.tensor([7, -1, 7, 42, -1, 42, 7, 42, -1])
    sampler = PKSampler(labels, p=3, k=2)  # 3 images each: two chunks of 2 (one topped up) per identity
    assert Counter(labels[i].item() for i in sampler) == {7: 4, -1: 4, 42: 4}


@pytest.mark.parametrize(
    ("labels", "p", "k", "message"),
    [
        ([0, 0, 1, 1], 0, 2, "must be >= 1"),
        ([0, 0, 1, 1], 2, 0, "must be >= 1"),
        ([0, 0, 1, 1], 3, 2, "only 2 identities"),
        ([], 1, 1, "non-empty"),
        ([[0, 1], [1, 0]], 1, 1, "1-D"),
        ([0.0, 1.0], 1, 1, "integers"),
    ],
)
def test_invalid_arguments(labels, p, k, message):
    with pytest.raises(ValueError, match=message):
        PKSampler(labels, p=p, k=k)


def test_dataloader_yields_pk_batches():
    labels = torch.tensor(make_labels([3, 5, 4, 6, 2, 5]))
    dataset = TensorDataset(torch.arange(len(labels)), labels)
    sampler = PKSampler(labels, p=2, k=3, seed=0)
    loader = DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler)
    seen = []
    # chunks of 3: 1 + 2 + 2 + 2 + 1 + 2 = 10, five batches of two distinct identities
    assert len(loader) == 5
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for index, label in loader:
            assert index.shape == (6,)
            assert torch.equal(labels[index], label)
            assert sorted(Counter(label.tolist()).values()) == [3, 3]
            seen.append(index)
    assert not torch.equal(torch.cat(seen[:5]), torch.cat(seen[5:]))


def test_shards_split_the_batches_of_one_epoch_between_processes():
    labels = torch.tensor(make_labels([3, 5, 4, 6, 2, 5]))
    whole = PKSampler(labels, p=2, k=3, seed=0)
    shards = [PKSampler(labels, p=2, k=3, seed=0, shard=(rank, 2)) for rank in (0, 1)]
    for epoch in range(2):
        for sampler in (whole, *shards):
            sampler.set_epoch(epoch)
        every = batches(whole)  # five batches: four are shared out, one is dropped so both get two
        assert [batches(s) for s in shards] == [every[0:4:2], every[1:4:2]]
        assert len(shards[0]) == len(shards[1]) == 2 * whole.batch_size
    with pytest.raises(ValueError, match="rank"):
        PKSampler(labels, p=2, k=3, shard=(2, 2))
