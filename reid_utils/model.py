"""The baseline re-ID network: an ImageNet ResNet, global pooling, and a small ``ClassBlock``.

Training treats re-ID as classification over the training identities; at test time the
classifier is thrown away and the 512-d vector before it is the person's embedding.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn
from torch.nn import init
from torchvision import models

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
OFFLINE_ENV_VAR = "REID_OFFLINE"  # set to 1 to never try a download (tests do)


def _init_kaiming(module: nn.Module) -> None:
    """He initialisation keeps activations at a sane scale through the new layers."""
    if isinstance(module, nn.Linear):
        init.kaiming_normal_(module.weight, a=0, mode="fan_out")
        init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d):
        init.normal_(module.weight, 1.0, 0.02)
        init.zeros_(module.bias)


def _init_classifier(module: nn.Module) -> None:
    """Tiny weights: every identity starts equally likely, so the first losses are near log(classes)."""
    if isinstance(module, nn.Linear):
        init.normal_(module.weight, std=0.001)
        init.zeros_(module.bias)


class ClassBlock(nn.Module):
    """Linear -> BatchNorm1d -> Dropout -> Linear(num_classes).

    The first half (``embedding``) turns the pooled backbone features into a compact,
    normalised 512-d description of a person; the second half (``classifier``) is only
    needed to train it.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        droprate: float = 0.5,
        linear_num: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_features, linear_num), nn.BatchNorm1d(linear_num)]
        if droprate > 0:
            layers.append(nn.Dropout(p=droprate))
        self.embedding = nn.Sequential(*layers)
        self.embedding.apply(_init_kaiming)
        self.classifier = nn.Linear(linear_num, num_classes)
        self.classifier.apply(_init_classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(x))


class BNNeck(nn.Module):
    """BatchNorm1d -> Linear(num_classes, no bias): the "BNNeck" head of Luo et al. (CVPRW 2019).

    The triplet loss works on the pooled features before the BatchNorm, the classifier after it;
    the normalised feature (``embedding``) is what evaluation uses. Splitting the two stops the
    two losses from pulling the same feature in different directions. The BatchNorm's shift is
    frozen at zero, as in the paper.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.embedding = nn.BatchNorm1d(in_features)
        self.embedding.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_features, num_classes, bias=False)
        init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(x))


def _weights_file_cached(weights: models.WeightsEnum) -> bool:
    filename = Path(weights.url).name
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def _can_reach(url: str, timeout: float = 3.0) -> bool:
    host = url.split("/")[2]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_imagenet_weights(backbone: str, quiet: bool = False) -> dict | None:
    """ImageNet weights from the torch cache, or a download where the network allows; else ``None``.

    Never hangs: a download is only tried when ``$REID_OFFLINE`` is unset and the weights
    host answers within a few seconds.
    """
    weights = models.get_model_weights(backbone).IMAGENET1K_V1
    if not _weights_file_cached(weights):
        offline = os.environ.get(OFFLINE_ENV_VAR, "") not in ("", "0")
        if offline or not _can_reach(weights.url):
            if not quiet:
                print(f"{backbone}: ImageNet weights are not available offline, so it starts from random weights.")
            return None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 - any network failure means: train from scratch
        if not quiet:
            print(f"{backbone}: could not download ImageNet weights ({err}), so it starts from random weights.")
        return None
    finally:
        socket.setdefaulttimeout(previous)


class ReIDNet(nn.Module):
    """ResNet backbone -> adaptive average pooling -> ``ClassBlock`` (or ``BNNeck``).

    ``stride=1`` removes the last down-sampling in ``layer4`` (the "last stride" trick):
    a feature map twice as tall and wide, more detail, a little more compute.
    ``bnneck=True`` replaces the ``ClassBlock`` with the ``BNNeck`` head.
    ``return_features=True``: in training, ``forward`` also returns the pooled features (the triplet loss's).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        droprate: float = 0.5,
        stride: int = 2,
        linear_num: int = 512,
        pretrained: bool = True,
        quiet: bool = False,
        bnneck: bool = False,
        return_features: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{backbone}': choose one of {', '.join(BACKBONES)}.")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}.")
        resnet = models.get_model(backbone, weights=None)
        state = load_imagenet_weights(backbone, quiet=quiet) if pretrained else None
        if state is not None:
            resnet.load_state_dict(state)
        if stride == 1:
            for module in resnet.layer4[0].modules():
                if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                    module.stride = (1, 1)
        self.backbone = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size -> one vector per image
        if bnneck:
            self.head = BNNeck(resnet.fc.in_features, num_classes)
        else:
            self.head = ClassBlock(resnet.fc.in_features, num_classes, droprate, linear_num)
        self.pretrained = state is not None
        self.return_features = return_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, ``batch x 2048`` for ResNet-50 (512 for ResNet-18/34)."""
        return self.pool(self.backbone(x)).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time description of each image: ``batch x linear_num`` (call in eval mode)."""
        return self.head.embedding(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training output: one score per training identity, ``batch x num_classes``; with ``return_features``,
        in training, ``(scores, pooled features)``, as layumi's ``return_feature`` does for the triplet loss."""
        features = self.features(x)
        scores = self.head(features)
        if self.return_features and self.training:
            return scores, features
        return scores


def build_model(opts, pretrained: bool = False, quiet: bool = True) -> ReIDNet:
    """The network a run's options describe (``TrainOptions`` or anything with the same fields)."""
    return ReIDNet(
        opts.num_classes, opts.backbone, opts.droprate, opts.stride, opts.linear_num,
        pretrained=pretrained, quiet=quiet, bnneck=opts.bnneck,
        return_features=getattr(opts, "triplet_weight", 0) > 0,  # the triplet loss needs them
    )  # fmt: skip


def unwrap(model: nn.Module) -> nn.Module:
    """The network itself, out of its wrappers (DataParallel, DistributedDataParallel, autocast, torch.compile).

    Checkpoints store the plain network's weights, so any run can be evaluated or resumed without them.
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # the parallel and autocast wrappers
            model = model.module
        else:
            return model


def select_device(gpu_ids: str, quiet: bool = False) -> tuple[torch.device, list[int]]:
    """``"0"`` -> cuda:0; ``"0,1"`` -> DataParallel over both; ``""`` -> CPU.

    Asking for a GPU on a machine without CUDA is not an error: the run falls back to the
    CPU and says so, because the same command should work on a laptop.
    """
    try:
        ids = [int(part) for part in str(gpu_ids).replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise ValueError(
            f"--gpu_ids '{gpu_ids}' is not a comma-separated list of GPU numbers (e.g. 0 or 0,1)."
        ) from None
    ids = [i for i in ids if i >= 0]  # the classic scripts use -1 for "no GPU"
    if not ids:
        return torch.device("cpu"), []
    if not torch.cuda.is_available():
        if not quiet:
            print(f"No CUDA GPU found: running on the CPU instead of GPU {','.join(map(str, ids))}.")
        return torch.device("cpu"), []
    missing = [i for i in ids if i >= torch.cuda.device_count()]
    if missing:
        raise ValueError(
            f"--gpu_ids names GPU {missing[0]}, but this machine has {torch.cuda.device_count()} "
            f"(numbered from 0). Check nvidia-smi."
        )
    return torch.device(f"cuda:{ids[0]}"), ids


def parameter_groups(model: nn.Module, lr: float) -> list[dict]:
    """Two learning rates: the pre-trained backbone moves 10x slower than the new layers.

    The backbone already knows useful features, so big steps would mostly destroy them;
    the new layers start from scratch and need to move fast.
    """
    net = unwrap(model)
    return [
        {"params": list(net.backbone.parameters()), "lr": 0.1 * lr, "name": "backbone"},
        {"params": list(net.head.parameters()), "lr": lr, "name": "new layers"},
    ]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_shapes(model: ReIDNet, images: torch.Tensor) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer name, output shape, parameters) for one batch through the network, in order."""
    rows = []
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    x = images
    with torch.no_grad():
        for name, layer in zip(names, model.backbone, strict=True):
            x = layer(x)
            rows.append((f"backbone.{name}", tuple(x.shape), count_parameters(layer)))
        x = model.pool(x)
        rows.append(("pool", tuple(x.shape), 0))
        x = x.flatten(1)
        rows.append(("flatten", tuple(x.shape), 0))
        x = model.head.embedding(x)
        rows.append(("head.embedding", tuple(x.shape), count_parameters(model.head.embedding)))
        x = model.head.classifier(x)
        rows.append(("head.classifier", tuple(x.shape), count_parameters(model.head.classifier)))
    return rows


def check_weights_fit(model: nn.Module, state: dict, source: str) -> None:
    """Say in one line why saved weights do not fit a model, instead of torch's list of every key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        example = (reshaped or missing or unexpected)[0]
        raise ValueError(
            f"{source} does not fit the model described by opts.yaml: {len(missing)} weights missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} of another shape (e.g. {example}). "
            f"Another backbone or number of identities? Train a new run or restore the run's own opts.yaml."
        )
