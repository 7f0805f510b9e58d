"""CNN trunks: torchvision ResNets with FrozenBatchNorm2d (the paper's), and a light stride-16 trunk with trainable
BatchNorm for small images and CPUs. Key names match the official DETR checkpoints (backbone.0.body.*)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_fast.models.position_encoding import PositionEmbeddingSine

_RESNETS = {"resnet18": (resnet18, 512), "resnet34": (resnet34, 512), "resnet50": (resnet50, 2048)}


class LightTrunk(nn.Module):
    """A small VGG-style trunk with trainable BatchNorm, for small images and CPUs. Every conv is followed by
    BatchNorm and ReLU.

    stem "conv": a 3x3 stride-2 conv to channels[0], then per further width a stride-2 and a stride-1 3x3 conv;
    stride 2 ** len(channels) (16 for four widths).
    stem "patch": a 4x4 stride-4 conv (non-overlapping patches) and a stride-1 3x3 conv at channels[0], then the
    same stages; stride 4 * 2 ** (len(channels) - 1) (16 for three widths). It skips the full-resolution layers,
    which on a CPU cost far more than their FLOPs (memory-bound BatchNorm/ReLU over the largest activations).

    images [B, 3, H, W] -> features [B, channels[-1], ~H/stride, ~W/stride].
    """

    def __init__(self, channels: list[int], stem: str = "conv"):
        super().__init__()
        if len(channels) < 2:
            raise ValueError("model.light_channels needs at least two widths")
        if stem == "conv":
            layers = _conv_bn_relu(3, channels[0], 3, 2)
            self.stride = 2 ** len(channels)
        elif stem == "patch":
            layers = _conv_bn_relu(3, channels[0], 4, 4, padding=0) + _conv_bn_relu(channels[0], channels[0], 3, 1)
            self.stride = 4 * 2 ** (len(channels) - 1)
        else:
            raise ValueError(f"model.light_stem must be 'conv' or 'patch', got {stem!r}")
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += _conv_bn_relu(cin, cout, 3, 2) + _conv_bn_relu(cout, cout, 3, 1)
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return {"0": self.layers(x)}


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int, padding: int | None = None) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Backbone(nn.Module):
    """The trunk plus mask down-sampling: (images [B,3,H,W], mask [B,H,W]) -> (features [B,C,h,w], mask [B,h,w])."""

    def __init__(self, name: str, train_backbone: bool = True, frozen_bn: bool = True, weights: str = "",
                 light_channels: list[int] | None = None, light_stem: str = "conv"):
        super().__init__()
        if name == "light":
            self.body = LightTrunk(light_channels or [32, 64, 128, 256], light_stem)
            self.num_channels = (light_channels or [256])[-1]
            if weights:
                warnings.warn("model.backbone_weights is ignored for the light trunk", stacklevel=2)
            return
        if name not in _RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_RESNETS)} or 'light'")
        ctor, self.num_channels = _RESNETS[name]
        net = ctor(weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"backbone weights {weights} do not fit {name}: missing {missing[:8]}, "
                                 f"unexpected {unexpected[:8]}")
        for pname, p in net.named_parameters():
            # as in the paper: the stem and layer1 stay frozen; layers 2-4 train unless the backbone LR is 0
            if not train_backbone or not any(s in pname for s in ("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        self.body = IntermediateLayerGetter(net, return_layers={"layer4": "0"})

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        feat = self.body(images)["0"]
        m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
        return feat, m


class Joiner(nn.Sequential):
    """backbone.0 = the trunk, backbone.1 = the position encoding (no parameters), as in the official keys."""

    def __init__(self, backbone: Backbone, position: PositionEmbeddingSine):
        super().__init__(backbone, position)
        self.num_channels = backbone.num_channels

    def forward(self, images, mask):
        feat, m = self[0](images, mask)
        pos = self[1](m).to(feat.dtype)
        return feat, m, pos
