"""Backbones: features equal to timm / torchvision on the same weights, real EfficientNet-Lite0 ImageNet
weights, freezing, GroupNorm fallback."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn
from torch.nn import functional as F

from part_distill import add_part_distill_config
from part_distill.modeling.backbone import (
    EfficientNetLiteBackbone,
    efficientnet_lite_pretrained_path,
    load_efficientnet_lite,
)

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# ImageNet-1k ids of the domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = {281, 282, 283, 284, 285}


def _cfg(backbone, **over):
    cfg = get_cfg()
    add_part_distill_config(cfg)
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18 if backbone.startswith("build_resnet") else 50
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    for k, v in over.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.fixture(scope="module")
def cat_image():
    skdata = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None]  # RGB 0..255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False)
    # the normalisation configs must use: PIXEL_MEAN = PIXEL_STD = 127.5, RGB
    return (img - 127.5) / 127.5


def _perturbed(module, seed):
    """Random norm affines and statistics, so an identity-like norm cannot hide a wrong layer order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith(("norm.weight", "bn1.weight", "bn2.weight", "bn0.weight", "running_var")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("norm.bias", "bn1.bias", "bn2.bias", "bn0.bias", "running_mean")):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return module


def _check_against(features, shapes, reference, size):
    assert list(features) == list(STRIDES) and set(shapes) == set(STRIDES)
    for (name, f), ref in zip(features.items(), reference):
        assert shapes[name].stride == STRIDES[name] and f.shape[1] == shapes[name].channels
        assert tuple(f.shape[-2:]) == tuple(-(-s // STRIDES[name]) for s in size), name
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_efficientnet_features_equal_timm_tf_efficientnet_lite0(norm):
    """timm's independent EfficientNet-Lite0 (TF "same" padding, as the ImageNet weights were trained)
    with our weights copied gives the same res2..res5 features, at an input size not divisible by 32."""
    timm = pytest.importorskip("timm")
    backbone = _perturbed(build_backbone(_cfg("build_efficientnet_lite_backbone",
                                              **{"MODEL.EFFICIENTNET.NORM": norm})), 0).eval()
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                            out_indices=(1, 2, 3, 4)).eval()
    # Both list the same layers in the same order (stem, then the 16 MBConv blocks): copy by position.
    ours = [v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    names = [k for k in ref.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(ours) == len(names)
    assert all(v.shape == ref.state_dict()[k].shape for v, k in zip(ours, names))
    ref.load_state_dict(dict(zip(names, ours)), strict=False)
    x = torch.randn(2, 3, 100, 76, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _check_against(backbone(x), backbone.output_shape(), ref(x), (100, 76))


def _torchvision_name(d2_name):
    """detectron2 ResNet parameter name -> torchvision's (res2 = layer1, shortcut = downsample)."""
    n = d2_name.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
    for i in range(2, 6):
        n = n.replace(f"res{i}.", f"layer{i - 1}.")
    n = n.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return n.replace("conv1.norm.", "bn1.").replace("conv2.norm.", "bn2.")


def test_resnet_gn_features_equal_torchvision_resnet18_with_groupnorm():
    """torchvision's ResNet-18 with GroupNorm(32) and our weights copied gives the same res2..res5."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    backbone = _perturbed(build_backbone(_cfg("build_resnet_gn_backbone")), 0).eval()
    ref = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(32, c)).eval()
    state = {_torchvision_name(k): v for k, v in backbone.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        stages = []
        for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            y = layer(y)
            stages.append(y)
        _check_against(backbone(x), backbone.output_shape(), stages, (128, 96))


def test_efficientnet_channels_and_subset_of_outputs():
    model = build_backbone(_cfg("build_efficientnet_lite_backbone", **{"MODEL.EFFICIENTNET.OUT_FEATURES": ["res3", "res4"]}))
    shapes = model.output_shape()
    assert {k: v.channels for k, v in shapes.items()} == {"res3": 40, "res4": 112}
    with torch.no_grad():
        assert set(model(torch.randn(1, 3, 64, 64))) == {"res3", "res4"}


def test_efficientnet_loads_packaged_imagenet_weights():
    state = torch.load(efficientnet_lite_pretrained_path(), map_location="cpu", weights_only=True)
    backbone = build_backbone(_cfg("build_efficientnet_lite_backbone"))
    random = build_backbone(_cfg("build_efficientnet_lite_backbone", **{"MODEL.EFFICIENTNET.PRETRAINED": False}))
    got, rnd = backbone.state_dict(), random.state_dict()
    compared = 0
    for k, v in state.items():
        key = "net." + k
        if key not in got:  # the dropped 1280-channel head and classifier
            assert k.startswith(("_conv_head", "_bn1", "_fc")), k
            continue
        assert torch.equal(got[key], v), key
        compared += 1
    assert compared > 100
    assert not torch.equal(got["net._blocks.5._expand_conv.weight"], rnd["net._blocks.5._expand_conv.weight"])


def test_efficientnet_backbone_classifies_a_cat(cat_image):
    """Real weights + right preprocessing + correct res5: backbone res5 fed to the ImageNet head."""
    full = load_efficientnet_lite().eval()
    backbone = build_backbone(_cfg("build_efficientnet_lite_backbone")).eval()
    with torch.no_grad():
        res5 = backbone(cat_image)["res5"]
        x = full._swish(full._bn1(full._conv_head(res5)))
        logits = full._fc(x.mean((2, 3)))
        ref_logits = full(cat_image)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert top5 & CAT_CLASSES, f"top-5 {top5} has no cat class"
    # and a random network does not: the check really depends on the weights
    rand = load_efficientnet_lite(weights=None).eval()
    with torch.no_grad():
        assert logits.softmax(-1)[0, list(CAT_CLASSES)].sum() > 5 * rand(cat_image).softmax(-1)[0, list(CAT_CLASSES)].sum()


def test_efficientnet_freeze_at_and_frozen_bn():
    cfg = _cfg("build_efficientnet_lite_backbone", **{"MODEL.BACKBONE.FREEZE_AT": 2, "MODEL.EFFICIENTNET.NORM": "BN"})
    model = build_backbone(cfg)
    net = model.net
    assert not net._conv_stem.weight.requires_grad and isinstance(net._bn0, FrozenBatchNorm2d)
    # res2 = blocks 0..2 (stride <= 4) frozen, res3 onwards trainable with ordinary BN
    assert all(not p.requires_grad for b in net._blocks[:3] for p in b.parameters())
    assert isinstance(net._blocks[2]._bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for b in net._blocks[3:] for p in b.parameters())
    assert isinstance(net._blocks[3]._bn1, nn.BatchNorm2d)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.float().mean() for v in out.values()).backward()
    assert net._conv_stem.weight.grad is None
    assert net._blocks[3]._expand_conv.weight.grad is not None
    assert net._blocks[3]._expand_conv.weight.grad.abs().sum() > 0


def test_efficientnet_default_norm_is_frozen():
    model = build_backbone(_cfg("build_efficientnet_lite_backbone"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_efficientnet_rejects_wrong_weights_and_channels():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        efficientnet_lite_pretrained_path("efficientnet-lite3")
    with pytest.raises(ValueError, match="3-channel"):
        build_backbone(_cfg("build_efficientnet_lite_backbone"), ShapeSpec(channels=1))
    with pytest.raises(ValueError, match="Unknown EfficientNet output"):
        EfficientNetLiteBackbone(load_efficientnet_lite(weights=None), out_features=["res6"])


@pytest.mark.parametrize("weights,expected", [("", nn.GroupNorm), ("some/checkpoint.pkl", FrozenBatchNorm2d)])
def test_resnet_uses_groupnorm_only_without_weights(weights, expected):
    model = build_backbone(_cfg("build_resnet_gn_backbone", **{"MODEL.WEIGHTS": weights}))
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, FrozenBatchNorm2d, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, expected) for m in norms)
    # checkpoint key names stay detectron2's, e.g. backbone.res2.0.conv1.norm.weight
    assert "res2.0.conv1.norm.weight" in model.state_dict()


def test_resnet_gn_trains_gradients_flow():
    model = build_backbone(_cfg("build_resnet_gn_backbone")).train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert model.stem.conv1.weight.grad.abs().sum() > 0
