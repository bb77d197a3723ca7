"""Official Mask2Former COCO instance checkpoints load into our InstanceSegmentor with no missing,
unexpected or mis-shaped keys, and the Swin backbone built on timm keeps Mask2Former's numerics.

The official parameter names and shapes below are written out from the public sources of
facebookresearch/Mask2Former (commit 161be51): mask2former/modeling/backbone/swin.py (SwinTransformer,
BasicLayer with PatchMerging at the end of stages 0-2, WindowAttention with a persistent
relative_position_index, norm0..norm3), pixel_decoder/msdeformattn.py (input_proj.{k}.{0,1},
transformer.level_embed, transformer.encoder.layers.{l}.{self_attn.*, norm1, linear1, linear2, norm2},
mask_features, adapter_1, layer_1), transformer_decoder/mask2former_transformer_decoder.py
(self/cross-attention, FFN, decoder_norm, query_feat, query_embed, level_embed, class_embed,
mask_embed.layers.{0,1,2}), the SetCriterion buffer ``empty_weight``, and detectron2's ResNet-50
(FrozenBN) for the R50 model; configs: configs/coco/instance-segmentation/
{Base-COCO-InstanceSegmentation, maskformer2_R50_bs16_50ep, swin/maskformer2_swin_large_IN21k_384_bs16_100ep}.yaml.
They are generated from that structure here, independently of our modules.
"""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from part_distill.engine.setup import build_cfg
from part_distill.modeling.backbone.swin import D2SwinTransformer, PaddedShiftWindowBlock
from part_distill.modeling.checkpoint import PartDistillCheckpointer, convert_swin_state_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mask2former_compat"
HIDDEN = 256


# ---------------------------------------------------------------- official names and shapes
def _norm(name, c, frozen_bn=False):
    if frozen_bn:
        return {f"{name}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _linear(name, out_c, in_c, bias=True):
    d = {f"{name}.weight": (out_c, in_c)}
    if bias:
        d[f"{name}.bias"] = (out_c,)
    return d


def official_resnet50_backbone(stem=64, res2=256, width=64):
    """detectron2 ResNet-50 with FrozenBN (Mask2Former's R50 backbone); the defaults are the real widths
    (STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, bottleneck width of res2)."""
    d = {"stem.conv1.weight": (stem, 3, 7, 7), **_norm("stem.conv1.norm", stem, True)}
    in_c = stem
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        mid, out_c = width * 2 ** (stage - 2), res2 * 2 ** (stage - 2)
        for b in range(blocks):
            p = f"res{stage}.{b}"
            if b == 0:
                d[f"{p}.shortcut.weight"] = (out_c, in_c, 1, 1)
                d.update(_norm(f"{p}.shortcut.norm", out_c, True))
            for conv, shape in (("conv1", (mid, in_c if b == 0 else out_c, 1, 1)), ("conv2", (mid, mid, 3, 3)),
                                ("conv3", (out_c, mid, 1, 1))):
                d[f"{p}.{conv}.weight"] = shape
                d.update(_norm(f"{p}.{conv}.norm", shape[0], True))
        in_c = out_c
    return {f"backbone.{k}": v for k, v in d.items()}, [res2 * 2 ** i for i in range(4)]


def official_swin_backbone(embed_dim, depths, num_heads, window):
    d = {"patch_embed.proj.weight": (embed_dim, 3, 4, 4), "patch_embed.proj.bias": (embed_dim,),
         **_norm("patch_embed.norm", embed_dim)}
    dims = [embed_dim * 2 ** i for i in range(len(depths))]
    for i, (depth, heads, dim) in enumerate(zip(depths, num_heads, dims)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            d.update(_norm(f"{p}.norm1", dim))
            d[f"{p}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
            d[f"{p}.attn.relative_position_index"] = (window * window, window * window)
            d.update(_linear(f"{p}.attn.qkv", 3 * dim, dim))
            d.update(_linear(f"{p}.attn.proj", dim, dim))
            d.update(_norm(f"{p}.norm2", dim))
            d.update(_linear(f"{p}.mlp.fc1", 4 * dim, dim))
            d.update(_linear(f"{p}.mlp.fc2", dim, 4 * dim))
        if i < len(depths) - 1:  # PatchMerging at the end of every stage but the last
            d.update(_linear(f"layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False))
            d.update(_norm(f"layers.{i}.downsample.norm", 4 * dim))
        d.update(_norm(f"norm{i}", dim))
    return {f"backbone.{k}": v for k, v in d.items()}, dims


def official_pixel_decoder(in_channels, enc_layers=6, n_heads=8, n_levels=3, n_points=4, hidden=HIDDEN, ffn=1024):
    d = {}
    for k, c in enumerate(in_channels[1:][::-1]):  # res5, res4, res3
        d[f"input_proj.{k}.0.weight"] = (hidden, c, 1, 1)
        d[f"input_proj.{k}.0.bias"] = (hidden,)
        d.update(_norm(f"input_proj.{k}.1", hidden))
    d["transformer.level_embed"] = (n_levels, hidden)
    for layer in range(enc_layers):
        p = f"transformer.encoder.layers.{layer}"
        d.update(_linear(f"{p}.self_attn.sampling_offsets", n_heads * n_levels * n_points * 2, hidden))
        d.update(_linear(f"{p}.self_attn.attention_weights", n_heads * n_levels * n_points, hidden))
        d.update(_linear(f"{p}.self_attn.value_proj", hidden, hidden))
        d.update(_linear(f"{p}.self_attn.output_proj", hidden, hidden))
        d.update(_norm(f"{p}.norm1", hidden))
        d.update(_linear(f"{p}.linear1", ffn, hidden))
        d.update(_linear(f"{p}.linear2", hidden, ffn))
        d.update(_norm(f"{p}.norm2", hidden))
    d["mask_features.weight"] = (hidden, hidden, 1, 1)
    d["mask_features.bias"] = (hidden,)
    # One FPN level (res2) below the stride-8 encoder input; GN convs have no bias.
    d["adapter_1.weight"] = (hidden, in_channels[0], 1, 1)
    d.update(_norm("adapter_1.norm", hidden))
    d["layer_1.weight"] = (hidden, hidden, 3, 3)
    d.update(_norm("layer_1.norm", hidden))
    return {f"sem_seg_head.pixel_decoder.{k}": v for k, v in d.items()}


def official_predictor(num_queries, num_classes=80, dec_layers=9, ffn=2048, hidden=HIDDEN):
    d = {}
    for i in range(dec_layers):
        for module, attn in (("transformer_self_attention_layers", "self_attn"),
                             ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{module}.{i}"
            d[f"{p}.{attn}.in_proj_weight"] = (3 * hidden, hidden)
            d[f"{p}.{attn}.in_proj_bias"] = (3 * hidden,)
            d.update(_linear(f"{p}.{attn}.out_proj", hidden, hidden))
            d.update(_norm(f"{p}.norm", hidden))
        p = f"transformer_ffn_layers.{i}"
        d.update(_linear(f"{p}.linear1", ffn, hidden))
        d.update(_linear(f"{p}.linear2", hidden, ffn))
        d.update(_norm(f"{p}.norm", hidden))
    d.update(_norm("decoder_norm", hidden))
    d["query_feat.weight"] = (num_queries, hidden)
    d["query_embed.weight"] = (num_queries, hidden)
    d["level_embed.weight"] = (3, hidden)
    d.update(_linear("class_embed", num_classes + 1, hidden))
    for k in range(3):
        d.update(_linear(f"mask_embed.layers.{k}", hidden, hidden))
    return {f"sem_seg_head.predictor.{k}": v for k, v in d.items()}


def brute_force_relative_position_index(window):
    """Swin's index: (dy + w - 1) * (2w - 1) + (dx + w - 1) for every token pair of a window."""
    coords = [(y, x) for y in range(window) for x in range(window)]
    return np.array([[(qy - ky + window - 1) * (2 * window - 1) + (qx - kx + window - 1)
                      for ky, kx in coords] for qy, qx in coords], dtype=np.int64)


def fill_random(shapes, seed=0):
    """Random float32 arrays (the real index for relative_position_index, which is derived)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("relative_position_index"):
            out[k] = brute_force_relative_position_index(int(round(shape[0] ** 0.5)))
        else:
            out[k] = rng.random(shape, dtype=np.float32)
    return out


def official_to_ours(key):
    """Expected name in our model: Swin patch merging moves from the end of stage i to the start of i+1;
    the learned queries of older releases, ``static_query``, are our ``query_feat``."""
    key = key.replace("sem_seg_head.predictor.static_query.", "sem_seg_head.predictor.query_feat.")
    parts = key.split(".")
    if key.startswith("backbone.layers.") and parts[3] == "downsample":
        parts[2] = str(int(parts[2]) + 1)
    return ".".join(parts)


def save_checkpoint(state, path, fmt):
    if fmt == "pkl":  # detectron2 model-zoo format, numpy arrays
        with open(path, "wb") as f:
            pickle.dump({"model": state, "__author__": "synthetic Mask2Former model zoo"}, f)
    else:
        torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)


def load_and_check(config, official, tmp_path, fmt, meta=False, opts=()):
    """Build the model of ``config`` (+ ``opts``), load ``official`` saved as ``fmt`` the way training
    does (``resume_or_load`` of our DetectionCheckpointer), compare every value.

    ``meta``: construct on the meta device and allocate without initialisation (Swin-L's 200M
    parameters take most of a test's time to initialise; every persistent value is loaded anyway).
    """
    path = tmp_path / f"model_final.{fmt}"
    save_checkpoint(official, path, fmt)
    cfg = build_cfg(str(CONFIGS / config), ["MODEL.WEIGHTS", str(path), "MODEL.DEVICE", "cpu", *opts])
    if meta:
        with torch.device("meta"):
            model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        model.to_empty(device="cpu")
    else:
        model = build_model(cfg)
    checkpointer = PartDistillCheckpointer(model)
    assert isinstance(checkpointer, DetectionCheckpointer)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    incompatible = checkpointer.last_incompatible
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    ours = model.state_dict()
    compared = 0
    for key, value in official.items():
        if key.endswith("relative_position_index"):
            assert official_to_ours(key) not in ours  # derived, recomputed by timm
            continue
        np.testing.assert_array_equal(ours[official_to_ours(key)].numpy(), value, err_msg=key)
        compared += 1
    assert compared == len(ours)
    return model


@pytest.mark.parametrize("fmt", ["pkl", "pth"])
def test_r50_coco_instance_checkpoint_loads_exactly(tmp_path, fmt):
    backbone, channels = official_resnet50_backbone()
    shapes = {**backbone, **official_pixel_decoder(channels), **official_predictor(num_queries=100),
              "criterion.empty_weight": (81,)}
    assert len(backbone) == 53 * 5  # 53 convs (stem, 16 x 3, 4 shortcuts), each weight + 4 FrozenBN buffers
    model = load_and_check("maskformer2_R50_coco_instance.yaml", fill_random(shapes), tmp_path, fmt)
    assert model.sem_seg_head.predictor.class_embed.out_features == 81


# Mask2Former's COCO-instance R50 layout at tiny widths (every official key, 9 -> 2 decoder layers).
TINY_R50_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "2", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS", "4",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "48", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "48", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
]


def test_tiny_model_zoo_pickle_with_static_query_loads_every_value(tmp_path):
    """A model-zoo ``.pkl`` ({"model": numpy arrays, "__author__"}) of the R50 layout whose learned queries
    use the official name ``static_query`` and which holds the criterion buffer: nothing missing or
    unexpected, and every array (all distinct random values) lands in the parameter of its name."""
    backbone, channels = official_resnet50_backbone(stem=8, res2=32, width=8)
    shapes = {**backbone,
              **official_pixel_decoder(channels, enc_layers=2, n_heads=4, hidden=32, ffn=48),
              **official_predictor(num_queries=8, num_classes=3, dec_layers=2, ffn=48, hidden=32),
              "criterion.empty_weight": (4,)}
    shapes["sem_seg_head.predictor.static_query.weight"] = shapes.pop("sem_seg_head.predictor.query_feat.weight")
    official = fill_random(shapes, seed=5)
    # random, not the default [1, 1, 1, 0.1]: a buffer left at its init would not pass
    model = load_and_check("maskformer2_R50_coco_instance.yaml", official, tmp_path, "pkl", opts=TINY_R50_OPTS)
    np.testing.assert_array_equal(model.sem_seg_head.predictor.query_feat.weight.detach().numpy(),
                                  official["sem_seg_head.predictor.static_query.weight"])
    np.testing.assert_array_equal(model.criterion.empty_weight.numpy(), official["criterion.empty_weight"])
    assert model.backbone.res5[0].conv3.weight.shape == (256, 64, 1, 1)  # tiny, not the real 2048 x 512


def test_swin_large_coco_instance_checkpoint_loads_exactly(tmp_path):
    backbone, dims = official_swin_backbone(192, [2, 2, 18, 2], [6, 12, 24, 48], window=12)
    shapes = {**backbone, **official_pixel_decoder(dims), **official_predictor(num_queries=200),
              "criterion.empty_weight": (81,)}
    model = load_and_check("maskformer2_swinL_coco_instance.yaml", fill_random(shapes), tmp_path, "pkl",
                           meta=True)
    assert isinstance(model.backbone, D2SwinTransformer)
    assert {k: v.channels for k, v in model.backbone.output_shape().items()} == {
        "res2": 192, "res3": 384, "res4": 768, "res5": 1536}


# ---------------------------------------------------------------- converter behaviour
def _tiny_swin(window=4):
    return D2SwinTransformer(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=window)


def test_converter_leaves_our_own_layout_unchanged():
    state = _tiny_swin().state_dict()
    assert convert_swin_state_dict(state) == state


def test_converter_rejects_index_of_other_window_size():
    model = _tiny_swin(window=4)
    shapes, _ = official_swin_backbone(16, [2, 2, 2, 2], [1, 2, 2, 4], window=4)
    official = {k[len("backbone."):]: torch.from_numpy(v) for k, v in fill_random(shapes).items()}
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.from_numpy(
        brute_force_relative_position_index(3))
    with pytest.raises(ValueError, match="WINDOW_SIZE"):
        convert_swin_state_dict(official, "", model.state_dict())


# ---------------------------------------------------------------- Swin backbone behaviour
@pytest.mark.parametrize("size", [(128, 96), (160, 224)])
def test_swin_shapes(size):
    model = _tiny_swin(window=7).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    shapes = model.output_shape()
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, feat in out.items():
        spec = shapes[name]
        assert tuple(feat.shape) == (2, spec.channels, h // spec.stride, w // spec.stride)
    assert [shapes[n].stride for n in out] == [4, 8, 16, 32]
    assert [shapes[n].channels for n in out] == [16, 32, 64, 128]


def naive_official_window_attention(block, x):
    """Mask2Former's W-MSA/SW-MSA written per query token: pad, roll, window, region mask of -100."""
    _, height, width, channels = x.shape
    w = block.window_size[0]
    s = block.shift_size[0]
    heads = block.attn.num_heads
    hp, wp = -(-height // w) * w, -(-width // w) * w
    padded = torch.zeros(1, hp, wp, channels)
    padded[:, :height, :width] = x
    qkv = block.attn.qkv(padded[0]).view(hp, wp, 3, heads, channels // heads)
    table = block.attn.relative_position_bias_table

    def region(r, size):
        return 0 if r < size - w else (1 if r < size - s else 2) if s else 0

    out = torch.zeros(height, width, channels)
    for py in range(height):
        for px in range(width):
            ry, rx = (py - s) % hp, (px - s) % wp  # position after the cyclic shift
            wy, wx = ry // w * w, rx // w * w
            logits, values = [], []
            for ky in range(wy, wy + w):
                for kx in range(wx, wx + w):
                    oy, ox = (ky + s) % hp, (kx + s) % wp  # key's position before the shift
                    k, v = qkv[oy, ox, 1], qkv[oy, ox, 2]
                    bias = table[(ry - ky + w - 1) * (2 * w - 1) + (rx - kx + w - 1)]
                    same = (region(ry, hp), region(rx, wp)) == (region(ky, hp), region(kx, wp))
                    scale = (channels // heads) ** -0.5
                    logits.append((qkv[py, px, 0] * k).sum(-1) * scale + bias + (0.0 if same else -100.0))
                    values.append(v)
            attn = torch.stack(logits).softmax(0)  # keys x heads
            out[py, px] = (attn[..., None] * torch.stack(values)).sum(0).reshape(-1)
    return block.attn.proj(out)[None]


@pytest.mark.parametrize("shift", [0, 2])
def test_block_windowing_matches_mask2former(shift):
    torch.manual_seed(0)
    block = PaddedShiftWindowBlock(dim=8, input_resolution=(4, 4), num_heads=2, window_size=4,
                                   shift_size=shift).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=1.0)
    x = torch.randn(1, 6, 7, 8)  # not a multiple of the window: padding matters
    with torch.no_grad():
        ours = block._attn(x)
        ref = naive_official_window_attention(block, x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_patch_merging_order_matches_mask2former():
    """Official PatchMerging concatenates x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]."""
    model = _tiny_swin()
    merge = model.layers[1].downsample
    x = torch.randn(1, 4, 6, 16)
    ref_in = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        torch.testing.assert_close(merge(x), merge.reduction(merge.norm(ref_in)))


def test_imagenet_swin_pickle_with_matching_heuristics(tmp_path):
    """Mask2Former's converted ImageNet Swin weights: backbone-relative keys, name-matched by detectron2."""
    holder = torch.nn.Module()
    holder.backbone = _tiny_swin()
    shapes, _ = official_swin_backbone(16, [2, 2, 2, 2], [1, 2, 2, 4], window=4)
    official = {k[len("backbone."):]: v for k, v in fill_random(shapes, seed=1).items()}
    official["head.weight"] = np.zeros((10, 128), dtype=np.float32)  # classifier, not in the backbone
    path = tmp_path / "swin_imagenet.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": official, "__author__": "third_party", "matching_heuristics": True}, f)
    checkpointer = PartDistillCheckpointer(holder)
    checkpointer.load(str(path))
    assert checkpointer.last_incompatible.missing_keys == []
    ours = holder.state_dict()
    for key, value in official.items():
        if key == "head.weight" or key.endswith("relative_position_index"):
            continue
        np.testing.assert_array_equal(ours[official_to_ours("backbone." + key)].numpy(), value, err_msg=key)


@pytest.mark.parametrize("stem_type, convs", [("basic", ["conv1"]), ("deeplab", ["conv1", "conv2", "conv3"])])
def test_resnet_stem_type_is_honoured(stem_type, convs):
    from detectron2.modeling import build_backbone

    cfg = build_cfg("", ["MODEL.BACKBONE.NAME", "build_resnet_deeplab_backbone", "MODEL.RESNETS.STEM_TYPE",
                         stem_type, "MODEL.RESNETS.OUT_FEATURES", ["res2"], "MODEL.DEVICE", "cpu"])
    stem = build_backbone(cfg).stem
    assert [n for n, _ in stem.named_children()] == convs


def test_resnet_unknown_stem_type_raises():
    from detectron2.modeling import build_backbone

    cfg = build_cfg("", ["MODEL.BACKBONE.NAME", "build_resnet_deeplab_backbone", "MODEL.RESNETS.STEM_TYPE",
                         "fancy", "MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match="stem type"):
        build_backbone(cfg)
