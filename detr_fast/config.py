"""Typed configuration: YAML files in configs/ read into dataclasses, with type-checked `section.key=value`
overrides. Unknown sections or keys are errors, so a typo never silently falls back to a default.

    cfg = load_config("configs/shapes.yaml", overrides=["train.epochs=3", "model.kernels=reference"])
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet50 | resnet34 | resnet18 | light
    backbone_weights: str = ""  # local torchvision-format state dict for the trunk; nothing is downloaded
    frozen_bn: bool = True  # FrozenBatchNorm2d in resnets (the paper); the light trunk trains its BatchNorm
    light_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # light trunk widths
    light_stem: str = "conv"  # light trunk: conv (3x3/2 stem, stride 2**len) | patch (4x4/4 stem, 4*2**(len-1))
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91  # class ids 0..num_classes-1; index num_classes is "no object"
    aux_loss: bool = True
    kernels: str = "fused"  # fused | reference: box kernels and assignment (reference = plain PyTorch + scipy)
    # fused | reference | auto. reference = nn.MultiheadAttention's math; auto = the fused kernel on CUDA tensors and
    # the reference on CPU tensors (the C++ CPU attention kernel is a correctness oracle, not a fast path)
    attention: str = "auto"
    fold_bn: bool = True  # fold FrozenBatchNorm2d into the preceding convolutions (exact; same state dict)
    # run the backbone in NHWC memory layout (the images converted, and under autocast cast, in one copy)
    channels_last: bool = False
    # post-norm steps norm(residual + dropout(x)) as one fused add_dropout_layernorm call (same parameters)
    fused_norm: bool = False
    # folded ResNet trunk: each conv's bias, the ReLUs and the residual adds as fused bias_act calls (same parameters;
    # needs fold_bn, frozen_bn and a resnet backbone)
    fused_bias_act: bool = False
    # with fused_bias_act, on a GPU: each trunk convolution with its bias (+ residual) + ReLU as one cuDNN call, one
    # pass fewer over each activation (equal to rounding; a backward of our own where gradients flow)
    conv_fusion: bool = False
    # with fused_bias_act: at each joint between ResNet blocks (inside and between stages), a block input's two
    # gradients (its first convolution's and the residual's) summed and masked by the previous block's ReLU in one
    # pass instead of two (bit-identical)
    residual_grad_fusion: bool = False
    # under autocast: the transformer's and heads' matrix weights cast in one kernel per forward and their gradients
    # in one per backward, instead of one per weight and use (bit-identical)
    flat_cast: bool = False
    # with the fused attention core: each self-attention's q and k in one matrix product, and the keys and values of
    # all decoder layers' cross-attentions in two, up front (same parameters; equal to rounding)
    packed_proj: bool = False
    # the FFN's ReLU and dropout as one relu_dropout call (its own dropout stream; the backward reads the output only)
    fused_ffn: bool = False
    # every linear layer's bias gradient as a matrix product (ones @ grad) instead of a column-sum reduction, in the
    # transformer and heads (equal to rounding; models/linear.py)
    bias_grad_mm: bool = False
    # the ResNet stem's max pool on a channels_last input by detr_fast.ops.max_pool2d_nhwc (forward only, where no
    # gradient flows: the frozen stem) instead of torch's kernel; the same values
    nhwc_pool: bool = False
    # the folded stem convolution's input and weight zero-padded to this many input channels where no gradient flows
    # (0: none; 8 puts a bf16 channels_last pixel on 16 bytes); equal to rounding
    stem_pad_channels: int = 0
    # the folded stem convolution (7x7, stride 2) as a stride-1 4x4 one on its input's space-to-depth (16 channels)
    # where no gradient flows (wins over stem_pad_channels); equal to rounding
    stem_space_to_depth: bool = False


@dataclass
class LossConfig:
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1


@dataclass
class DataConfig:
    dataset: str = "coco"  # coco | shapes
    root: str = "data/coco"  # COCO layout: {train2017,val2017}/ and annotations/instances_{train,val}2017.json
    train_images: str = ""  # explicit paths override the layout under root
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    pipeline: str = "auto"  # auto | torch | dali (auto: dali where a GPU and DALI exist, else torch)
    batch_size: int = 2
    num_workers: int = 2
    # DETR's augmentations: flip; short side from `scales`, long side <= max_size; with p=0.5 resize to
    # crop_resize, random crop of crop_min..crop_max, then the multi-scale resize.
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_prob: float = 0.5  # probability of the resize-crop-resize branch (0 disables cropping)
    # fixed training shapes (for train.cuda_graph or a compiled model): pad H and W each up to the smallest of these
    # sizes (empty: the batch's largest image), and the targets to max_targets rows (0: the batch's largest count)
    pad_to: list[int] = field(default_factory=list)
    max_targets: int = 0
    crop_resize: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    val_size: int = 800
    # shapes dataset generator (python -m detr_fast make-shapes)
    shapes_train: int = 4000
    shapes_val: int = 500
    shapes_image_size: int = 128
    shapes_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 300
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 200  # lr_schedule "step": epoch at which the LR drops 10x
    lr_schedule: str = "step"  # step (10x drop at lr_drop) | cosine (to lr_min_factor at the last epoch)
    lr_min_factor: float = 0.01  # cosine: final LR as a fraction of the peak
    warmup_steps: int = 0  # linear warm-up of every group's LR over the first optimizer steps
    clip_max_norm: float = 0.1
    amp: str = "none"  # none | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 42
    output_dir: str = "runs/detr"
    resume: str = ""  # checkpoint path to continue from
    pretrained: str = ""  # official DETR or detr_fast checkpoint to start from
    eval_every: int = 1  # epochs between COCO evaluations (the last epoch is always evaluated)
    log_every: int = 20  # steps between loss read-backs from the device
    max_steps_per_epoch: int = 0  # 0 = the whole epoch
    # capture the training step as CUDA graphs (one per padded shape) and replay them: needs a GPU, one process,
    # amp none or bf16, data.pad_to and data.max_targets (fixed shapes) and the CUDA matcher kernels
    cuda_graph: bool = False
    # cuDNN autotuning (torch.backends.cudnn.benchmark): each new convolution shape is timed once over cuDNN's
    # algorithms and the fastest kept; pays when shapes repeat (data.pad_to buckets, fixed-size training), costs a
    # tuning pass per new shape otherwise
    cudnn_benchmark: bool = False
    time_limit_min: float = 0.0  # 0 = none; else stop before an epoch that would end past it (longest epoch so far)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _convert(value, typ, where: str):
    """Check and convert a YAML/override value to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {typ}")


def _section_types(section_cls) -> dict:
    return typing.get_type_hints(section_cls)


def _apply(cfg: Config, section: str, key: str, value, where: str) -> None:
    hints = typing.get_type_hints(Config)
    if section not in hints:
        raise ConfigError(f"{where}: unknown section '{section}' (known: {', '.join(hints)})")
    sec_obj = getattr(cfg, section)
    types = _section_types(type(sec_obj))
    if key not in types:
        raise ConfigError(f"{where}: unknown key '{section}.{key}' (known: {', '.join(types)})")
    setattr(sec_obj, key, _convert(value, types[key], f"{where} {section}.{key}"))


CHOICES = {
    ("model", "backbone"): ("resnet50", "resnet34", "resnet18", "light"),
    ("model", "kernels"): ("fused", "reference"),
    ("model", "attention"): ("fused", "reference", "auto"),
    ("model", "light_stem"): ("conv", "patch"),
    ("data", "dataset"): ("coco", "shapes"),
    ("data", "pipeline"): ("auto", "torch", "dali"),
    ("train", "amp"): ("none", "bf16", "fp16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "lr_schedule"): ("step", "cosine"),
}


def validate(cfg: Config) -> Config:
    for (sec, key), allowed in CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in allowed:
            raise ConfigError(f"{sec}.{key} must be one of {allowed}, got {v!r}")
    if cfg.model.hidden_dim % cfg.model.nheads:
        raise ConfigError("model.hidden_dim must be divisible by model.nheads")
    if cfg.model.num_classes < 1 or cfg.model.num_queries < 1:
        raise ConfigError("model.num_classes and model.num_queries must be positive")
    if not 0.0 <= cfg.data.crop_prob <= 1.0:
        raise ConfigError("data.crop_prob must lie in [0, 1]")
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size must be positive")
    if cfg.data.max_targets < 0 or any(b < 1 for b in cfg.data.pad_to):
        raise ConfigError("data.max_targets must be >= 0 and data.pad_to sizes positive")
    if cfg.data.max_targets > cfg.model.num_queries:
        raise ConfigError(f"data.max_targets ({cfg.data.max_targets}) must not exceed model.num_queries "
                          f"({cfg.model.num_queries}): every target needs its own query")
    m = cfg.model
    if m.fused_bias_act and not (m.fold_bn and m.frozen_bn and m.backbone != "light"):
        raise ConfigError(f"model.fused_bias_act needs model.fold_bn=true, model.frozen_bn=true and a resnet backbone "
                          f"(it fuses the folded FrozenBatchNorm's bias into the ResNet blocks); got fold_bn="
                          f"{str(m.fold_bn).lower()}, frozen_bn={str(m.frozen_bn).lower()}, backbone={m.backbone}")
    if m.stem_pad_channels and not (m.fold_bn and m.frozen_bn and m.backbone != "light"):
        raise ConfigError("model.stem_pad_channels needs model.fold_bn=true, model.frozen_bn=true and a resnet "
                          "backbone (it pads the folded stem convolution)")
    if m.stem_space_to_depth and not (m.fold_bn and m.frozen_bn and m.backbone != "light"):
        raise ConfigError("model.stem_space_to_depth needs model.fold_bn=true, model.frozen_bn=true and a resnet "
                          "backbone (it rewrites the folded stem convolution)")
    if m.stem_pad_channels < 0:
        raise ConfigError(f"model.stem_pad_channels must be >= 0, got {m.stem_pad_channels}")
    if m.residual_grad_fusion and not m.fused_bias_act:
        raise ConfigError("model.residual_grad_fusion needs model.fused_bias_act=true (it chains the fused ResNet "
                          "blocks)")
    if m.conv_fusion and not m.fused_bias_act:
        raise ConfigError("model.conv_fusion needs model.fused_bias_act=true (it runs the fused blocks' convolutions "
                          "through cuDNN)")
    if cfg.train.cuda_graph:
        if cfg.train.amp == "fp16":
            raise ConfigError("train.cuda_graph does not work with amp fp16 (its GradScaler reads the device); use "
                              "bf16 or none")
        if not cfg.data.pad_to or cfg.data.max_targets <= 0:
            raise ConfigError("train.cuda_graph needs fixed shapes: set data.pad_to (e.g. [512, 640, 800, 1024, "
                              "1344]) and data.max_targets (e.g. 100)")
    if cfg.train.warmup_steps < 0:
        raise ConfigError("train.warmup_steps must be >= 0")
    if not 0.0 <= cfg.train.lr_min_factor <= 1.0:
        raise ConfigError("train.lr_min_factor must lie in [0, 1]")
    return cfg


def parse_override(text: str):
    """'section.key=value' -> (section, key, value); the value is parsed as YAML (3, 1e-4, true, [1, 2], abc)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    value = yaml.safe_load(rhs) if rhs.strip() else ""
    return section, key, "" if value is None else value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: the built-in defaults) and apply `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply `section.key=value` overrides to cfg in place with the type checks; returns cfg validated."""
    for text in overrides or []:
        section, key, value = parse_override(text)
        sec = getattr(cfg, section, None) if section in typing.get_type_hints(Config) else None
        if sec is not None and _section_types(type(sec)).get(key) is str and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()  # a bare number given for a string field (a path) stays a string
        _apply(cfg, section, key, value, "override")
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from Config.to_dict() (e.g. the one stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "checkpoint config")
    return validate(cfg)
