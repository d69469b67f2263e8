"""Tests for reid_utils.losses: a hand-worked batch-hard case, edge cases, gradients, and a training step."""

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from reid_utils.losses import ReIDLoss, WarmUp, batch_hard_triplet_loss, hardest_pairs, pairwise_distances

# Four 1-d embeddings on a line, two identities, margin 0.3:
#
#   idx  x    label   hardest positive      hardest negative           relu(d_ap - d_an + 0.3)
#    0   0.0  0       |0 - 2|   = 2.0       min(2.5, 3.0)      = 2.5   relu(2.0 - 2.5 + 0.3) = 0
#    1   2.0  0       |2 - 0|   = 2.0       min(0.5, 1.0)      = 0.5   relu(2.0 - 0.5 + 0.3) = 1.8
#    2   2.5  1       |2.5 - 3| = 0.5       min(2.5, 0.5)      = 0.5   relu(0.5 - 0.5 + 0.3) = 0.3
#    3   3.0  1       |3 - 2.5| = 0.5       min(3.0, 1.0)      = 1.0   relu(0.5 - 1.0 + 0.3) = 0
#
# Loss = mean(0, 1.8, 0.3, 0) = 0.525.
# Soft margin: gaps d_ap - d_an = (-0.5, 1.5, 0.0, -0.5), loss = mean(log(1 + exp(gap))).
LINE_X = [0.0, 2.0, 2.5, 3.0]
LINE_LABELS = [0, 0, 1, 1]
LINE_D_AP = [2.0, 2.0, 0.5, 0.5]
LINE_D_AN = [2.5, 0.5, 0.5, 1.0]
LINE_LOSS = 0.525
LINE_SOFT_LOSS = sum(math.log1p(math.exp(g)) for g in (-0.5, 1.5, 0.0, -0.5)) / 4


def line_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LINE_X, dtype=torch.float64)[:, None], torch.tensor(LINE_LABELS)


def test_pairwise_distances_match_cdist_and_diagonal_is_zero():
    x = torch.randn(10, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dist = pairwise_distances(x)
    torch.testing.assert_close(dist, torch.cdist(x, x))
    torch.testing.assert_close(pairwise_distances(x, squared=True), torch.cdist(x, x).pow(2))
    assert torch.equal(dist.diagonal(), torch.zeros(10, dtype=torch.float64))


def test_pairwise_distances_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        pairwise_distances(torch.zeros(3))


def test_hardest_pairs_by_hand():
    x, labels = line_batch()
    d_ap, d_an = hardest_pairs(pairwise_distances(x), labels)
    torch.testing.assert_close(d_ap, torch.tensor(LINE_D_AP, dtype=torch.float64))
    torch.testing.assert_close(d_an, torch.tensor(LINE_D_AN, dtype=torch.float64))


def test_hardest_pairs_marks_anchors_without_positive_or_negative():
    dist = pairwise_distances(torch.tensor([[0.0], [1.0], [5.0]]))
    pairs = hardest_pairs(dist, torch.tensor([0, 0, 1]))  # identity 1 has a single image: no positive
    assert pairs.d_ap[2] == float("-inf")
    assert pairs.valid.tolist() == [True, True, False]
    single_id = hardest_pairs(dist, torch.tensor([4, 4, 4]))  # one identity: nobody has a negative
    assert torch.isinf(single_id.d_an).all() and not single_id.valid.any()


def test_loss_by_hand():
    x, labels = line_batch()
    assert batch_hard_triplet_loss(x, labels, margin=0.3).item() == pytest.approx(LINE_LOSS)
    assert batch_hard_triplet_loss(x, labels, margin=0.3).item() == pytest.approx(LINE_LOSS)


def test_soft_margin_by_hand_and_positive_even_when_separated():
    x, labels = line_batch()
    assert batch_hard_triplet_loss(x, labels, soft=True).item() == pytest.approx(LINE_SOFT_LOSS)
    far = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    assert batch_hard_triplet_loss(far, labels, soft=True).item() > 0
    assert batch_hard_triplet_loss(far, labels, soft=True).item() > 0


def test_zero_loss_when_identities_are_separated_beyond_the_margin():
    far = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.1]])
    assert batch_hard_triplet_loss(far, torch.tensor(LINE_LABELS), margin=0.3).item() == 0.0


def test_anchors_without_positive_are_left_out_of_the_mean():
    # A fifth, far-away image of a third identity changes nobody's hardest negative and has no positive itself.
    x, labels = line_batch()
    x5 = torch.cat([x, torch.tensor([[100.0]], dtype=torch.float64)])
    labels5 = torch.cat([labels, torch.tensor([2])])
    assert batch_hard_triplet_loss(x5, labels5).item() == pytest.approx(LINE_LOSS)


def test_gradients_are_finite_with_duplicate_embeddings():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 1.0]], requires_grad=True)
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    y = x.detach().clone().requires_grad_(True)
    pairwise_distances(y).sum().backward()  # every zero distance, diagonal and duplicates alike
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]], ids=["all-distinct", "one-identity"])
def test_error_when_no_anchor_has_a_triplet(labels):
    with pytest.raises(ValueError, match="PKSampler"):
        batch_hard_triplet_loss(torch.randn(4, 3), torch.tensor(labels))


def test_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one entry per row"):
        batch_hard_triplet_loss(torch.randn(4, 3), torch.tensor([0, 0, 1]))


def test_optimising_embeddings_lowers_the_loss():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=generator).requires_grad_(True)
    labels = torch.arange(4).repeat_interleave(4)  # P=4 identities x K=4 images
    optimizer = torch.optim.SGD([x], lr=1.0)  # large: the mean over 16 anchors makes each gradient small
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = batch_hard_triplet_loss(x, labels, margin=0.3)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(later <= earlier for earlier, later in pairwise(losses))


def test_reid_loss_gets_the_pooled_features_from_the_forward_pass_in_training_only():
    """A network built for the triplet loss returns ``(scores, features)`` in training (layumi's ``return_feature``),
    with no hook; in evaluation it returns scores only, and only the ID loss counts."""
    from reid_utils.model import ReIDNet

    torch.manual_seed(0)
    net = ReIDNet(4, backbone="resnet18", pretrained=False, return_features=True)
    images, labels = torch.randn(8, 3, 32, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    criterion = ReIDLoss(triplet_weight=1.0)
    features = net.features(images)  # BatchNorm in training mode: the same batch gives the same features
    outputs = net(images)
    assert isinstance(outputs, tuple) and torch.allclose(outputs[1], features)
    logits = outputs[0]
    expected = nn.functional.cross_entropy(logits, labels) + batch_hard_triplet_loss(features, labels)
    assert torch.allclose(criterion(outputs, labels), expected)
    assert torch.equal(criterion(logits, labels), nn.functional.cross_entropy(logits, labels))  # scores alone: ID
    net.eval()
    with torch.no_grad():
        logits = net(images)
    assert isinstance(logits, torch.Tensor)
    assert torch.equal(criterion(logits, labels), nn.functional.cross_entropy(logits, labels))  # val: no triplet


def test_warm_up_scales_training_losses_from_a_tenth_to_one():
    warm = WarmUp(iterations=3)
    factors = [warm.step() for _ in range(5)]
    assert factors == pytest.approx([0.4, 0.7, 1.0, 1.0, 1.0])  # 0.1 + 0.9 * step / iterations, at most 1


def test_warm_up_scales_and_counts_only_training_steps():
    """The loop's one warm-up line: training losses are scaled, the validation phase is neither scaled nor counted."""
    from torch.utils.data import DataLoader, TensorDataset

    from reid_utils.train import train_one_phase

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.tensor([0, 1] * 4)), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the same loss every pass
    device = torch.device("cpu")
    plain = train_one_phase(model, loader, "val", nn.CrossEntropyLoss(), optimizer, device)
    cold = WarmUp(iterations=4)
    val = train_one_phase(model, loader, "val", nn.CrossEntropyLoss(), optimizer, device, warm_up=cold)
    assert val.running_loss == plain.running_loss and cold.factor == 0.1
    scaled = train_one_phase(model, loader, "train", nn.CrossEntropyLoss(), optimizer, device, warm_up=cold)
    assert cold.factor == pytest.approx(0.55)  # two steps of 0.9 / 4
    batch_losses = [nn.functional.cross_entropy(model(x), y).item() * 4 for x, y in loader]
    assert scaled.running_loss == pytest.approx(0.325 * batch_losses[0] + 0.55 * batch_losses[1])
