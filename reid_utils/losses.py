"""The training losses: cross-entropy over the identities, the batch-hard triplet loss, and warm-up.

A classification (ID) loss teaches the network to tell the *training* identities apart, but at test
time we rank unseen people by distance. The triplet loss trains that distance directly: an anchor must
be closer to every image of its own identity (positives) than to any other identity (negatives), by a
margin.

Batch-hard mining (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", 2017): inside a batch of P identities x K images, each anchor is paired with its
*hardest* positive (the farthest image of the same person) and *hardest* negative (the closest image
of someone else). Only batches with several images per identity have positives at all, hence the P x K
sampler in ``reid_utils.samplers``.

Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-identification", CVPRW 2019, use
this loss with margin 0.3 and P=16, K=4 alongside the ID loss; with their BNNeck the triplet loss sees
the features *before* the BatchNorm layer and the ID loss the features after it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_MARGIN = 0.3  # Luo et al. 2019


class HardestPairs(NamedTuple):
    """Per-anchor distance to the hardest positive and the hardest negative.

    An anchor with no positive in the batch gets ``d_ap = -inf`` (the max of an empty set); one with no
    negative gets ``d_an = +inf``. ``valid`` marks anchors that have both, the only ones a triplet exists for.
    """

    d_ap: Tensor
    d_an: Tensor

    @property
    def valid(self) -> Tensor:
        """Anchors with at least one positive and one negative (both distances finite)."""
        return torch.isfinite(self.d_ap) & torch.isfinite(self.d_an)


def pairwise_distances(embeddings: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """All pairwise Euclidean distances between the rows of an ``(N, D)`` tensor, as ``(N, N)``.

    Uses ``|a - b|^2 = |a|^2 - 2 a.b + |b|^2`` (one matrix product instead of an ``(N, N, D)`` tensor of
    differences). Rounding can make that slightly negative, so it is clamped at 0, and the diagonal is set
    to exactly 0. The derivative of ``sqrt`` is infinite at 0 -- which every anchor-to-itself distance and
    every duplicate embedding hits -- so the square root is taken of ``max(d^2, eps)`` and zero distances
    are put back with ``torch.where``: values stay exact and gradients stay finite.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    sq_norms = embeddings.pow(2).sum(dim=1)
    sq = sq_norms[:, None] - 2.0 * embeddings @ embeddings.T + sq_norms[None, :]
    sq = sq.clamp_min(0.0)
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    sq = sq.masked_fill(eye, 0.0)
    if squared:
        return sq
    return torch.where(sq > 0, sq.clamp_min(eps).sqrt(), torch.zeros_like(sq))


def _check_labels(n: int, labels: Tensor) -> None:
    """Fail early with shapes in the message rather than deep inside a broadcast."""
    if labels.dim() != 1 or labels.numel() != n:
        raise ValueError(f"labels must be 1-D with one entry per row ({n}), got shape {tuple(labels.shape)}")


def hardest_pairs(dist: Tensor, labels: Tensor) -> HardestPairs:
    """For each anchor (row of ``dist``), the distance to its hardest positive and hardest negative.

    Hardest positive: the *largest* distance to another image with the same label (the anchor itself
    does not count). Hardest negative: the *smallest* distance to an image with a different label.
    Returned separately from the loss so notebooks can plot them. Excluded entries are filled with
    -inf / +inf before the max / min, so gradients reach only the selected pairs.
    """
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square (N, N) matrix, got shape {tuple(dist.shape)}")
    _check_labels(dist.shape[0], labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=dist.device)
    positive = same & ~eye
    negative = ~same
    d_ap = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    return HardestPairs(d_ap, d_an)


def batch_hard_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = DEFAULT_MARGIN, soft: bool = False
) -> Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017), averaged over anchors that have a triplet.

    Per anchor: ``relu(d_ap - d_an + margin)`` -- zero once the closest other person is at least
    ``margin`` farther away than the farthest image of the same person. With ``soft=True`` the hinge is
    replaced by ``softplus(d_ap - d_an)``, Hermans et al.'s "soft margin": it never becomes exactly zero,
    so already-separated triplets keep pulling a little, and there is no margin to tune (``margin`` is
    ignored). Distances are plain Euclidean, which Hermans et al. found more stable than squared.

    Raises ``ValueError`` when no anchor has both a positive and a negative, e.g. a batch with one image
    per identity (a plain shuffled loader) or a batch with a single identity.
    """
    _check_labels(embeddings.shape[0], labels)
    pairs = hardest_pairs(pairwise_distances(embeddings), labels)
    valid = pairs.valid
    if not bool(valid.any()):
        raise ValueError(
            "no anchor in this batch has both a positive (another image of the same identity) and a negative "
            f"({labels.numel()} images, {labels.unique().numel()} identities); use a PxK sampler "
            "(reid_utils.samplers.PKSampler) so every batch holds P identities with K > 1 images each"
        )
    gap = pairs.d_ap[valid] - pairs.d_an[valid]
    per_anchor = F.softplus(gap) if soft else F.relu(gap + margin)
    return per_anchor.mean()


class ReIDLoss(nn.Module):
    """Cross-entropy over the training identities (optionally label-smoothed) [+ a batch-hard triplet term].

    Label smoothing gives the true identity 1 - eps + eps/C and every other identity eps/C, so the
    network is never pushed towards infinitely confident scores on a few hundred training people.
    The triplet term pulls the features of one person together and pushes others away directly,
    which is what retrieval needs; it only applies in training, where batches hold K images per person.

    The loop calls ``criterion(outputs, labels)`` as the classic script does. A ``ReIDNet`` built for the
    triplet loss returns ``(scores, features)`` in training (layumi's ``return_feature``): the triplet term
    uses those pooled features. In validation the network returns scores only, and only the ID loss counts.
    """

    def __init__(self, label_smoothing: float = 0.0, triplet_weight: float = 0.0, margin: float = DEFAULT_MARGIN):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.triplet_weight = triplet_weight
        self.margin = margin

    def forward(self, outputs: Tensor | tuple[Tensor, Tensor], labels: Tensor, features: Tensor | None = None
                ) -> Tensor:  # fmt: skip
        """The loss of one batch: ``outputs`` are the scores, or ``(scores, features)``."""
        if isinstance(outputs, tuple):
            outputs, features = outputs
        loss = self.cross_entropy(outputs, labels)
        if self.triplet_weight > 0 and features is not None:
            loss = loss + self.triplet_weight * batch_hard_triplet_loss(features, labels, margin=self.margin)
        return loss


class WarmUp:
    """Warm-up as the classic ``train.py`` does it: the training loss is scaled from 0.1 up to 1 over the
    first ``iterations`` training steps (``warm_epoch`` epochs).

    Scaling the loss scales every gradient, so the first steps are small -- like a growing learning rate --
    while the new, random layers settle; big early steps would wreck pre-trained features. The loop asks for
    each training step's factor (``step``); ``factor`` is saved in checkpoints to resume.
    """

    def __init__(self, iterations: int, factor: float = 0.1) -> None:
        self.iterations = max(1, iterations)
        self.factor = factor

    def step(self) -> float:
        """The next training step's factor: the classic ``warm_up = min(1.0, warm_up + 0.9 / warm_iteration)``."""
        if self.factor < 1.0:
            self.factor = min(1.0, self.factor + 0.9 / self.iterations)
        return self.factor
