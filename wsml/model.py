"""Backbone + global average pooling + linear head.

The head is a separate module so it gets its own learning rate (the paper:
10x the backbone's) and so LinearInit can train it alone on frozen features.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from wsml.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


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


def resnet50(weights: str) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 without its fc layer (it ends in average pooling)."""
    import torchvision

    if weights == "imagenet":
        # torchvision's normal download (cached in ~/.cache/torch, hash-checked); needs internet once.
        # Loaded here rather than by resnet50(weights=...) so that it is read with weights_only=True.
        net = torchvision.models.resnet50(weights=None)
        url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
        try:
            state = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.get_state_dict(
                progress=True, check_hash=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as err:   # not a plain state dict, or a torn file
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            raise ConfigError(f"ImageNet weights {cached} cannot be read as a state dict ({type(err).__name__}): "
                              "delete the file to download it again") from err
        net.load_state_dict(state)
    else:
        net = torchvision.models.resnet50(weights=None)
        if weights != "none":
            _load_backbone_file(net, Path(weights))
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _load_backbone_file(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found: pass --weights imagenet, none, or an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
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


def build_model(arch: str, num_classes: int, weights: str) -> Classifier:
    if arch == "smallcnn":
        if weights != "none":
            raise ConfigError(f"arch smallcnn has no pretrained weights (got --weights {weights}): pass --weights none")
        backbone, dim = small_cnn()
    elif arch == "resnet50":
        backbone, dim = resnet50(weights)
    else:
        raise ConfigError(f"unknown arch {arch!r}: choose resnet50 or smallcnn")
    return Classifier(backbone, dim, num_classes)


def weights_id(arch: str, weights: str) -> str:
    """Identifies the frozen backbone for the LinearInit feature cache."""
    if weights in ("imagenet", "none"):
        return f"{arch}:{weights}"
    stat = Path(weights).stat()
    return f"{arch}:{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
