"""Backbone + global average pooling + linear head, optionally with BoostLU.

The head is a separate module so it gets its own learning rate (the paper:
10x the backbone's) and so LinearInit can train it alone on frozen features.

BoostLU (Kim et al., CVPR 2023, "Bridging the Gap between Model Explanations
in Partially Annotated Multi-label Classification"; github.com/youngwk/
BridgeGapExplanationPAMC, models.py): the head is applied as a 1x1
convolution to the backbone's last feature map, giving a class activation map
(CAM); its positive values are multiplied by `alpha`, and global average
pooling of that map gives the logits. The 1x1 convolution uses the linear
head's own weight and bias, so parameter names, shapes and initialisation are
those of the plain model, and with alpha = 1 the logits are exactly the linear
head on pooled features (averaging commutes with an affine map).
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsml.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 feature_map: Callable[[nn.Module, torch.Tensor], torch.Tensor], boostlu_alpha: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        # a plain function of the backbone (not a module): no parameters of its own, safe to deepcopy
        self._feature_map = feature_map
        self.boostlu_alpha = boostlu_alpha

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (what LinearInit trains the head on)."""
        return self.backbone(images)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, (N, feature_dim, h, w), before its average pooling."""
        return self._feature_map(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # fixed per model, not per batch: no data-dependent Python branch in a captured CUDA graph
        if self.boostlu_alpha is None:
            return self.head(self.backbone(images))
        return boostlu_cam(self.feature_map(images), self.head, self.boostlu_alpha).mean(dim=(2, 3))


def boostlu_cam(feature_map: torch.Tensor, head: nn.Linear, alpha: float) -> torch.Tensor:
    """The head as a 1x1 convolution over `feature_map` (a C-channel CAM), positive entries times alpha.

    As in the published code, the boost is part of the model's forward: it applies in training
    and at evaluation alike. `torch.where` keeps the step free of data-dependent control flow.
    """
    cam = F.conv2d(feature_map, head.weight[:, :, None, None], head.bias)
    return torch.where(cam > 0, cam * alpha, cam)


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn() -> tuple[nn.Module, int]:
    """A CPU-sized CNN for the 32 x 32 `digits` mosaics (three 2-conv stages)."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (16, 32, 64):
        layers += _block(c_in, c_out) + _block(c_out, c_out) + [nn.MaxPool2d(2)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def _small_cnn_feature_map(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last conv stage's map (after its max pooling): every layer but the final pool and flatten."""
    assert isinstance(net, nn.Sequential)
    x = images
    for layer in list(net)[:-2]:
        x = layer(x)
    return x


def imagenet_weights_file() -> Path:
    """Where torch.hub keeps ResNet-50's ImageNet weights (`resnet50("imagenet")` downloads them there)."""
    import torchvision

    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def resnet50(weights: str) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 without its fc layer (it ends in average pooling)."""
    import torchvision

    if weights == "imagenet":
        # torchvision's normal download (cached in $TORCH_HOME, default ~/.cache/torch, hash-checked); needs
        # internet once (`python -m orchestration.offline fetch` on a cluster whose nodes have none).
        # Loaded here rather than by resnet50(weights=...) so that it is read with weights_only=True.
        net = torchvision.models.resnet50(weights=None)
        try:
            state = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.get_state_dict(
                progress=True, check_hash=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as err:   # not a plain state dict, or a torn file
            cached = imagenet_weights_file()
            raise ConfigError(f"ImageNet weights {cached} cannot be read as a state dict ({type(err).__name__}): "
                              "delete the file to download it again") from err
        except OSError as err:      # not there, and its folder cannot be written (a read-only HOME) or no network
            cached = imagenet_weights_file()
            raise ConfigError(f"ImageNet weights {cached} are not there and cannot be downloaded ({type(err).__name__}: "
                              f"{err}): set TORCH_HOME to a writable folder (on a machine without internet, fetch "
                              "them there first: python -m orchestration.offline fetch), or pass --weights none "
                              "or a file") from None
        net.load_state_dict(state)
    else:
        net = torchvision.models.resnet50(weights=None)
        if weights != "none":
            _load_backbone_file(net, Path(weights))
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _resnet_feature_map(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """layer4's output: torchvision's ResNet forward up to (not including) its average pooling."""
    import torchvision

    assert isinstance(net, torchvision.models.ResNet)
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _load_backbone_file(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found: pass --weights imagenet, none, or an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the same to the user
        raise ConfigError(f"weights file {path} is not a loadable state dict ({type(err).__name__}): "
                          "save it with torch.save(model.state_dict(), path)") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(f"weights file {path} does not fit torchvision's ResNet-50 "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                          f"{(missing + unexpected)[0]}): pass a ResNet-50 state dict")


def build_model(arch: str, num_classes: int, weights: str, boostlu_alpha: float | None = None) -> Classifier:
    if arch == "smallcnn":
        if weights != "none":
            raise ConfigError(f"arch smallcnn has no pretrained weights (got --weights {weights}): pass --weights none")
        backbone, dim = small_cnn()
        feature_map = _small_cnn_feature_map
    elif arch == "resnet50":
        backbone, dim = resnet50(weights)
        feature_map = _resnet_feature_map
    else:
        raise ConfigError(f"unknown arch {arch!r}: choose resnet50 or smallcnn")
    return Classifier(backbone, dim, num_classes, feature_map, boostlu_alpha)


def weights_id(arch: str, weights: str) -> str:
    """Identifies the frozen backbone for the LinearInit feature cache."""
    if weights in ("imagenet", "none"):
        return f"{arch}:{weights}"
    stat = Path(weights).stat()
    return f"{arch}:{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
