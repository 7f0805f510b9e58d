"""DETR model: output shapes, official state-dict key names and shapes, attention implementations agree."""
from pathlib import Path

import pytest
import torch
from helpers import small_cfg

from detr_fast.config import load_config
from detr_fast.models import build_detr


def _batch(B=2, H=67, W=91, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 50:, :] = True  # second image is 50 x 70, padded
    mask[1, :, 70:] = True
    return images, mask


def test_output_shapes():
    cfg = small_cfg()
    model = build_detr(cfg).eval()
    images, mask = _batch()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 2
    for a in out["aux_outputs"]:
        assert a["pred_logits"].shape == (2, 7, 6) and a["pred_boxes"].shape == (2, 7, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert torch.isfinite(out["pred_logits"]).all()


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_masked_memory_positions_do_not_influence_the_decoder(impl):
    """Features at padded positions are keys the transformer must ignore: changing them changes nothing."""
    from detr_fast.models.transformer import Transformer
    torch.manual_seed(0)
    tr = Transformer(32, 4, 2, 2, 64, 0.0, attn_impl=impl).eval()
    src = torch.randn(2, 32, 5, 6)
    pos = torch.randn(2, 32, 5, 6)
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = True
    q = torch.randn(7, 32)
    hs = tr(src, mask, q, pos)
    src2, pos2 = src.clone(), pos.clone()
    src2[1, :, 3:, :] = 50.0
    pos2[1, :, 3:, :] = -7.0
    hs2 = tr(src2, mask, q, pos2)
    assert hs.shape == (2, 2, 7, 32)
    torch.testing.assert_close(hs, hs2)
    src2[1, :, 0, 0] = 50.0  # an unpadded position does matter
    assert not torch.allclose(tr(src2, mask, q, pos2)[:, 1], hs[:, 1])


R50_SHAPES = {
    "backbone.0.body.conv1.weight": (64, 3, 7, 7),
    "backbone.0.body.bn1.running_var": (64,),
    "backbone.0.body.layer1.0.conv1.weight": (64, 64, 1, 1),
    "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "backbone.0.body.layer4.2.bn3.bias": (2048,),
    "input_proj.weight": (256, 2048, 1, 1),
    "input_proj.bias": (256,),
    "query_embed.weight": (100, 256),
    "class_embed.weight": (92, 256),
    "class_embed.bias": (92,),
    "bbox_embed.layers.0.weight": (256, 256),
    "bbox_embed.layers.2.weight": (4, 256),
    "transformer.encoder.layers.0.self_attn.in_proj_weight": (768, 256),
    "transformer.encoder.layers.5.self_attn.out_proj.weight": (256, 256),
    "transformer.encoder.layers.5.linear1.weight": (2048, 256),
    "transformer.encoder.layers.5.norm2.bias": (256,),
    "transformer.decoder.layers.0.multihead_attn.in_proj_bias": (768,),
    "transformer.decoder.layers.5.norm3.weight": (256,),
    "transformer.decoder.norm.weight": (256,),
}


def test_r50_state_dict_matches_official_names_and_shapes():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "detr_r50_coco.yaml")
    sd = build_detr(cfg).state_dict()
    for k, shape in R50_SHAPES.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    # the official checkpoint's key families, nothing more
    prefixes = ("backbone.0.body.", "transformer.encoder.layers.", "transformer.decoder.layers.",
                "transformer.decoder.norm.", "class_embed.", "bbox_embed.layers.", "query_embed.", "input_proj.")
    assert all(k.startswith(prefixes) for k in sd), [k for k in sd if not k.startswith(prefixes)]
    assert not any("num_batches_tracked" in k for k in sd)  # FrozenBatchNorm2d
    assert not any(k.startswith("transformer.encoder.norm") for k in sd)  # post-norm: no encoder norm
    # 6 encoder layers x 12 tensors, 6 decoder layers x 18 tensors, the decoder norm 2
    n_tr = sum(k.startswith("transformer.") for k in sd)
    assert n_tr == 6 * 12 + 6 * 18 + 2
    assert sum(p.numel() for p in build_detr(cfg).parameters()) == 41_524_768
    # stem and layer1 frozen, layers 2-4 trainable (as in the paper)
    model = build_detr(cfg)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not grads["backbone.0.body.conv1.weight"]
    assert not grads["backbone.0.body.layer1.0.conv1.weight"]
    assert grads["backbone.0.body.layer2.0.conv1.weight"]


def test_attention_impls_agree_on_same_weights():
    torch.manual_seed(0)
    m_ref = build_detr(small_cfg(**{"model.attention": "reference"})).eval()
    m_fused = build_detr(small_cfg(**{"model.attention": "fused"})).eval()
    m_fused.load_state_dict(m_ref.state_dict(), strict=True)
    images, mask = _batch()
    with torch.no_grad():
        a, b = m_ref(images, mask), m_fused(images, mask)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stem,channels,stride", [("conv", [8, 16, 16, 32], 16), ("conv", [8, 16, 32], 8),
                                                  ("patch", [8, 16, 32], 16), ("patch", [8, 16], 8)])
def test_light_trunk_strides_and_shapes(stem, channels, stride):
    from detr_fast.models.backbone import Backbone, LightTrunk

    trunk = LightTrunk(channels, stem)
    assert trunk.stride == stride
    for h, w in ((128, 128), (67, 91)):
        feat = trunk(torch.randn(2, 3, h, w))["0"]
        assert feat.shape[:2] == (2, channels[-1])
        # at most one cell more than the exact quotient per axis (padding of the stride-2 convs rounds up)
        assert h // stride <= feat.shape[2] <= -(-h // stride) and w // stride <= feat.shape[3] <= -(-w // stride)
    images, mask = _batch(H=67, W=91)
    feat, m = Backbone("light", light_channels=channels, light_stem=stem)(images, mask)
    assert m.shape == (2, *feat.shape[-2:]) and m.dtype == torch.bool
    assert not m[0].any() and m[1].any()  # the padded image's mask survives the down-sampling
    with pytest.raises(ValueError, match="light_stem"):
        LightTrunk(channels, "pool")


def test_light_conv_trunk_keeps_its_parameter_names():
    """Checkpoints of the light trunk stay loadable: the conv-stem layer indices are fixed."""
    names = [n for n, _ in build_detr(small_cfg()).named_parameters() if n.startswith("backbone.0.body.")]
    assert names[:3] == ["backbone.0.body.layers.0.weight", "backbone.0.body.layers.1.weight",
                         "backbone.0.body.layers.1.bias"]
    # seven conv-BN-ReLU triples: the last conv is layer 18, its BatchNorm layer 19
    assert names[-3:] == ["backbone.0.body.layers.18.weight", "backbone.0.body.layers.19.weight",
                          "backbone.0.body.layers.19.bias"]
    patch = build_detr(small_cfg(**{"model.light_stem": "patch", "model.light_channels": "[8,16,32]"}))
    out = patch(*_batch())
    assert out["pred_boxes"].shape == (2, 7, 4)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet34", 512)])
def test_smaller_resnets(name, channels):
    cfg = small_cfg(**{"model.backbone": name})
    model = build_detr(cfg).eval()
    assert model.input_proj.weight.shape[1] == channels
    out = model(*_batch(H=64, W=64))
    assert out["pred_boxes"].shape == (2, 7, 4)


def test_backbone_weights_from_local_file(tmp_path):
    from torchvision.models import resnet18
    net = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    model = build_detr(small_cfg(**{"model.backbone": "resnet18", "model.backbone_weights": str(path)}))
    torch.testing.assert_close(model.backbone[0].body.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    torch.save({"bogus.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="do not fit"):
        build_detr(small_cfg(**{"model.backbone": "resnet18", "model.backbone_weights": str(path)}))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_decoder_outputs_are_each_layer_through_the_final_norm(dtype):
    """The decoder normalizes its stacked layer outputs in one call: the same values, bit for bit, as the final
    LayerNorm applied to each layer's output on its own (DETR's definition)."""
    from detr_fast.models.transformer import Transformer

    torch.manual_seed(int(torch.randint(0, 1000, ())))
    t = Transformer(32, 4, 2, 3, 48, 0.0, attn_impl="fused").to(dtype)
    B, h, w, Q = 2, 5, 7, 6
    src, pos = torch.randn(B, 32, h, w, dtype=dtype), torch.randn(B, 32, h, w, dtype=dtype)
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    mask[1, 3:] = True
    query = torch.randn(Q, 32, dtype=dtype)
    hs = t(src, mask, query, pos)
    flat_pos, flat_mask = pos.flatten(2).transpose(1, 2), mask.flatten(1)
    memory = t.encoder(src.flatten(2).transpose(1, 2), flat_mask, flat_pos)
    tgt, want = torch.zeros(B, Q, 32, dtype=dtype), []
    for layer in t.decoder.layers:
        tgt = layer(tgt, memory, flat_mask, flat_pos, query.expand(B, -1, -1))
        want.append(t.decoder.norm(tgt))
    assert hs.shape == (3, B, Q, 32) and torch.equal(hs, torch.stack(want))
