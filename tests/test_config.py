"""Typed config: YAML sections into dataclasses, checked overrides, unknown keys and bad values are errors."""
from pathlib import Path

import pytest

from detr_fast.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    shapes = load_config(CONFIGS / "shapes.yaml")
    assert shapes.model.backbone == "light" and shapes.data.dataset == "shapes"
    coco = load_config(CONFIGS / "detr_r50_coco.yaml")
    assert (coco.model.hidden_dim, coco.model.enc_layers, coco.model.num_queries) == (256, 6, 100)
    assert coco.train.lr == 1e-4 and coco.train.lr_backbone == 1e-5 and coco.train.clip_max_norm == 0.1
    fast = load_config(CONFIGS / "detr_r50_coco_fast.yaml")
    m = fast.model
    assert m.fused_norm and m.fused_bias_act and m.flat_cast and m.packed_proj and m.fused_ffn and m.channels_last
    assert m.fold_bn and m.conv_fusion and not coco.model.conv_fusion
    # the options timed as gains on a GPU are on; stem_pad_channels (timed as a loss) is off
    assert m.bias_grad_mm and m.nhwc_pool and m.residual_grad_fusion and m.stem_space_to_depth
    assert m.stem_pad_channels == 0
    assert fast.train.amp == "bf16"
    # the paper's settings otherwise: the two files differ only in the fast-path options, amp and the output folder
    skip = {("model", k) for k in ("channels_last", "fused_norm", "fused_bias_act", "flat_cast", "packed_proj",
                                   "fused_ffn", "conv_fusion", "bias_grad_mm", "nhwc_pool",
                                   "residual_grad_fusion", "stem_space_to_depth")}
    skip |= {("train", "amp"), ("train", "output_dir")}
    for section in ("model", "loss", "data", "train"):
        a, b = vars(getattr(coco, section)), vars(getattr(fast, section))
        assert {k: v for k, v in a.items() if (section, k) not in skip} == \
            {k: v for k, v in b.items() if (section, k) not in skip}, section
    graphed = load_config(CONFIGS / "detr_r50_coco_fast.yaml", ["data.pad_to=[640,800,1024,1333]",
                                                                "data.max_targets=100", "train.cuda_graph=true",
                                                                "train.cudnn_benchmark=true"])
    assert graphed.train.cuda_graph and graphed.train.cudnn_benchmark and not fast.train.cudnn_benchmark


def test_overrides_are_type_checked():
    cfg = load_config(None, ["train.epochs=3", "train.lr=1e-3", "data.scales=[96, 128]", "model.aux_loss=false",
                             "train.output_dir=2017"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.scales == [96, 128] and cfg.model.aux_loss is False
    assert cfg.train.output_dir == "2017"  # a number given for a path stays a string
    for bad, msg in [("train.epochs=3.5", "integer"), ("train.lr=fast", "number"), ("model.aux_loss=1", "true/false"),
                     ("data.scales=128", "list"), ("train.epoch=3", "unknown key"), ("trian.epochs=3", "section"),
                     ("model.kernels=cuda", "must be one of"), ("epochs=3", "section.key=value"),
                     ("data.crop_prob=1.5", "crop_prob")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.epochz'"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_a_checkpoint_dict():
    cfg = load_config(CONFIGS / "shapes.yaml", ["train.epochs=5"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
