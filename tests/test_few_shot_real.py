"""The few-shot driver (tools/few_shot.py, Table 4) end to end at 1 % on real formats: the Pascal-Part samples
(from ../shared) and a generated PartImageNet split, a tiny model and two iterations per cell. Each table
value is recomputed from the cell's saved model: pycocotools' AR and the mIoU evaluator run directly."""
import json
import os
import subprocess
import sys

import pytest
import torch

import part_distill  # noqa: F401  (registers datasets and models)
from detectron2.data import DatasetCatalog, MetadataCatalog
from part_distill.drivers.few_shot_table import run_dir
from part_distill.engine.setup import build_cfg
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.evaluation import PartMIoUEvaluator
from part_distill.modeling.checkpoint import PartDistillCheckpointer
from _tiny_part_model import tiny_part_cfg
from test_eval_ar import _coco_ar
from test_zero_shot import HAVE_SAMPLES, MODEL_OPTS, REPO, _evaluate, real_datasets_root

SUPERVISED_OPTS = [
    "PART_DISTILL.STAGE", "supervised", "MODEL.META_ARCHITECTURE", "SupervisedPartModel",
    "MODEL.PART_DISTILL.NUM_PART_CLASSES", "-1", "MODEL.PART_DISTILL.NUM_OBJECT_CLASSES", "-1",
    "MODEL.PART_DISTILL.OBJECTS", "gt", "INPUT.DATASET_MAPPER_NAME", "PartTargetLSJMapper",
    "INPUT.PART_CLASS_KEY", "category_id", "INPUT.IMAGE_SIZE", "64", "SOLVER.IMS_PER_BATCH", "1",
    "SOLVER.BASE_LR", "0.001", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "100", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64", "TEST.EVAL_PERIOD", "0",
    "TEST.PARTS.EVALUATORS", '["PartAREvaluator", "PartMIoUEvaluator"]', "TEST.PARTS.ASSOCIATION", "identity",
    "SEED", "0",
]
# target -> (train, test, initialisations run on it)
TARGETS = {"part_imagenet": ("part_imagenet_train_parts", "part_imagenet_val_parts", ("ours", "other_ckpt"))}
if HAVE_SAMPLES:
    TARGETS["pascal_part"] = ("pascal_part_train_parts", "pascal_part_val_parts", ("ours",))


@pytest.fixture(scope="module")
def few_shot_runs(tmp_path_factory):
    root = real_datasets_root(tmp_path_factory.mktemp("real"))
    work = tmp_path_factory.mktemp("fs")
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)
    # Initialisations: two slot-head models (20 object classes x 2 slots) of different seeds.
    inits = {}
    for seed, name in enumerate(("ours", "other_ckpt")):
        torch.manual_seed(seed)
        inits[name] = str(work / f"{name}.pth")
        torch.save({"model": PartDistillTrainer.build_model(tiny_part_cfg(*MODEL_OPTS)).state_dict()}, inits[name])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = {}
    try:
        for target, (train, test, names) in TARGETS.items():
            cfg = tiny_part_cfg(*MODEL_OPTS, *SUPERVISED_OPTS, "DATASETS.TRAIN", f"('{train}',)",
                                "DATASETS.TEST", f"('{test}',)")
            config = work / f"{target}.yaml"
            config.write_text(cfg.dump())
            out = work / target
            argv = [sys.executable, "tools/few_shot.py", "--config-file", str(config), "--percents", "1",
                    "--output", str(out)]
            for name in names:
                argv += ["--ours", inits[name]] if name == "ours" else ["--init", f"{name}={inits[name]}"]
            proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
            runs[target] = {"config": str(config), "out": out, "proc": proc, "cfg": cfg}
        yield runs
    finally:
        if old is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = old


@pytest.mark.slow
def test_few_shot_table_at_one_percent_matches_direct_evaluation(few_shot_runs):
    for target, (train, test, names) in TARGETS.items():
        run = few_shot_runs[target]
        assert run["proc"].returncode == 0, run["proc"].stdout[-3000:] + run["proc"].stderr[-3000:]
        # The part vocabulary is the target's, from its metadata (-1 in the config).
        assert run["cfg"].MODEL.PART_DISTILL.NUM_PART_CLASSES == len(MetadataCatalog.get(train).part_classes)
        with open(run["out"] / "few_shot.json") as f:
            table = json.load(f)
        assert table["dataset"] == target and list(table["results"]) == list(names)
        md = (run["out"] / "few_shot.md").read_text()
        assert ("| PartDistillation (ours) |" in md) and all(f"| {n} |" in md for n in names if n != "ours")
        dicts = DatasetCatalog.get(test)
        for name in names:
            cell = table["results"][name]["1"]
            d = run_dir(str(run["out"]), name, 1.0)
            with open(os.path.join(d, "eval_results.json")) as f:
                info = json.load(f)["supervised"]
            # 1 % of a 2- or 3-image training set: one image, from the nested few-shot subset.
            assert cell["train_images"] == 1 and info["percent"] == 1.0 and info["iterations"] == 2
            assert info["train_datasets"] == [f"{train}_fewshot1"]
            assert "part_predictor.class_embed.weight" in info["reinitialised"]
            cfg = build_cfg(run["config"], ["MODEL.WEIGHTS", os.path.join(d, "model_final.pth")])
            model = PartDistillTrainer.build_model(cfg)
            PartDistillCheckpointer(model).load(cfg.MODEL.WEIGHTS)
            model.eval()
            by_id = {}
            with torch.no_grad():
                for batch in PartDistillTrainer.build_test_loader(cfg, test):
                    by_id[batch[0]["image_id"]] = model(batch)[0]
            outputs = [by_id[x["image_id"]] for x in dicts]
            assert sum(len(o["parts"]) for o in outputs) > 0
            assert cell["AR@200"] == pytest.approx(100 * _coco_ar(dicts, outputs, 200), abs=1e-6)
            miou = _evaluate(PartMIoUEvaluator, cfg, test, dicts, outputs)["parts_miou"]["mIoU"]
            assert cell["mIoU"] == pytest.approx(miou, abs=1e-6)
