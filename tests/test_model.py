import pytest
import torch
from torch import nn

from reid_utils.model import ClassBlock, ReIDNet, count_parameters, layer_shapes, parameter_groups


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ReIDNet(num_classes=10, backbone="resnet18", pretrained=False).eval()


def test_logits_and_embedding_shapes(net):
    x = torch.randn(3, 3, 64, 32)
    assert net(x).shape == (3, 10)
    assert net.features(x).shape == (3, 512)
    assert net.embed(x).shape == (3, 512)


def test_any_input_size_thanks_to_adaptive_pooling(net):
    assert net(torch.randn(2, 3, 96, 48)).shape == (2, 10)


def test_resnet50_has_2048_features_and_last_stride_doubles_the_map():
    net2 = ReIDNet(5, backbone="resnet50", pretrained=False)
    net1 = ReIDNet(5, backbone="resnet50", stride=1, pretrained=False)
    x = torch.randn(2, 3, 128, 64)
    assert net2.backbone(x).shape == (2, 2048, 4, 2)
    assert net1.backbone(x).shape == (2, 2048, 8, 4)
    assert net1.features(x).shape == (2, 2048)


def test_class_block_init():
    torch.manual_seed(0)
    block = ClassBlock(2048, 751)
    linear, bn = block.embedding[0], block.embedding[1]
    assert [type(m) for m in block.embedding] == [nn.Linear, nn.BatchNorm1d, nn.Dropout]
    assert 0.4 < linear.weight.std().item() / (2 / 512) ** 0.5 < 1.6  # Kaiming, fan_out = 512
    assert abs(bn.weight.mean().item() - 1) < 0.01 and 0.01 < bn.weight.std().item() < 0.03
    assert 0.0007 < block.classifier.weight.std().item() < 0.0013  # N(0, 0.001)
    assert torch.count_nonzero(block.classifier.bias) == 0
    assert [type(m) for m in ClassBlock(8, 2, droprate=0).embedding] == [nn.Linear, nn.BatchNorm1d]


def test_untrained_classifier_is_uniform(net):
    """Tiny classifier weights: the first loss is close to log(num_classes)."""
    logits = net(torch.randn(4, 3, 64, 32))
    loss = nn.functional.cross_entropy(logits, torch.arange(4))
    assert abs(loss.item() - torch.log(torch.tensor(10.0)).item()) < 0.05


def test_two_learning_rates_cover_all_parameters(net):
    groups = parameter_groups(net, lr=0.05)
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.05])
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(net)


def test_offline_means_random_init_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REID_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    model = ReIDNet(3, backbone="resnet18")
    out = capsys.readouterr().out.strip().splitlines()
    assert not model.pretrained
    assert len(out) == 1 and "random weights" in out[0]


def test_unknown_backbone():
    with pytest.raises(ValueError, match="resnet50"):
        ReIDNet(3, backbone="vgg16", pretrained=False)


def test_layer_shapes_follow_the_forward_pass(net):
    x = torch.randn(2, 3, 64, 32)
    rows = layer_shapes(net, x)
    assert rows[0] == ("backbone.conv1", (2, 64, 32, 16), 64 * 3 * 7 * 7)
    assert rows[-1][1] == tuple(net(x).shape)
    assert sum(params for _, _, params in rows) == count_parameters(net)


def test_bnneck_head_embeds_the_normalised_pooled_feature():
    torch.manual_seed(0)
    net = ReIDNet(6, backbone="resnet18", bnneck=True, pretrained=False)
    x = torch.randn(4, 3, 64, 32)
    logits, features = net(x), net.features(x)
    assert logits.shape == (4, 6) and features.shape == (4, 512)
    assert not net.head.embedding.bias.requires_grad and net.head.classifier.bias is None
    net.eval()
    assert torch.allclose(net.embed(x), net.head.embedding(net.features(x)))
