"""The stage driver skips finished steps and stops on failure; the demo report reads every stage."""
import importlib.util
import json
import os
import sys

import pytest

from part_distill.drivers.demo import build_demo_steps, collect_results, update_readme, write_demo_report
from part_distill.drivers.pipeline import Step, StepFailed, run_steps


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_run_steps_skips_done_and_resumes_after_failure(tmp_path):
    counter = tmp_path / "count.txt"
    ok = _script(tmp_path, "ok.py", "import sys\nopen(sys.argv[1], 'a').write('x')\nopen(sys.argv[2], 'w').write('done')\n")
    bad = _script(tmp_path, "bad.py", "import sys\nprint('boom'); sys.exit(3)\n")
    steps = [Step("a", [ok, str(counter), str(tmp_path / "a.done")], str(tmp_path / "a.done")),
             Step("b", [bad], str(tmp_path / "b.done")),
             Step("c", [ok, str(counter), str(tmp_path / "c.done")], str(tmp_path / "c.done"))]
    with pytest.raises(StepFailed, match="boom") as failure:
        run_steps(steps, str(tmp_path / "logs"), echo=lambda *_: None)
    assert counter.read_text() == "x"  # a ran, c never started
    assert failure.value.step == "b" and list(failure.value.timings) == ["a"]
    assert failure.value.log_path == str(tmp_path / "logs" / "b.log")
    steps[1] = Step("b", [ok, str(counter), str(tmp_path / "b.done")], str(tmp_path / "b.done"))
    timings = run_steps(steps, str(tmp_path / "logs"), echo=lambda *_: None)
    assert timings["a"] == "skipped" and timings["b"] != "skipped" and timings["c"] != "skipped"
    assert counter.read_text() == "xxx"  # a was not re-run


def test_step_that_exits_zero_without_its_result_fails(tmp_path):
    noop = _script(tmp_path, "noop.py", "pass\n")
    with pytest.raises(StepFailed, match="expected"):
        run_steps([Step("n", [noop], str(tmp_path / "never"))], str(tmp_path / "logs"), echo=lambda *_: None)


def test_demo_steps_chain_through_files():
    steps = {s.name: s for s in build_demo_steps("OUT")}
    # each stage reads exactly the file its predecessor promises
    assert steps["proposal"].argv[steps["proposal"].argv.index("PART_DISTILL.PSEUDO_LABELS.MANIFEST") + 1] \
        == steps["mine_train"].done_file
    w = lambda s: steps[s].argv[steps[s].argv.index("MODEL.WEIGHTS") + 1]  # noqa: E731
    assert w("self_train") == os.path.join("OUT", "proposal", "model_final.pth")
    assert w("distill") == os.path.join("OUT", "ranking", "model_final.pth")
    assert all(s.argv[0].startswith("tools/") for s in steps.values())
    # the one-stage baseline trains on the dataset-level store, the predicted-object evaluations read
    # the checkpoints the stages write and the mined-parts row the teacher's own val predictions
    arg = lambda s, key: steps[s].argv[steps[s].argv.index(key) + 1]  # noqa: E731
    assert arg("one_stage", "PART_DISTILL.PSEUDO_LABELS.MANIFEST") == steps["mine_train_clusters"].done_file
    assert arg("mine_train_clusters", "MINING.LEVEL") == "dataset"
    assert w("eval_one_stage_pred") == os.path.join("OUT", "one_stage", "round_1", "model_final.pth")
    assert w("eval_distill_pred") == os.path.join("OUT", "distill", "round_0", "model_final.pth")
    assert arg("eval_distill_pred", "MODEL.PART_DISTILL.OBJECTS") == "predicted"
    assert arg("mine_val_pred", "MINING.OBJECT_JSON").startswith(os.path.join("OUT", "instance_teacher", "inference"))
    names = [s.name for s in build_demo_steps("OUT")]
    assert names.index("instance_teacher") < names.index("mine_val_pred") < names.index("eval_mined_pred")


def test_report_collects_stage_metrics_and_updates_readme(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    (out / "eval" / "mined").mkdir(parents=True)
    mined_ar = {"AR@1-gtobj_union": 2.0, "AR@10-gtobj_union": 8.0, "AR@50-gtobj_union": 14.0,
                "AR@100-gtobj_union": 17.0, "AR@200-gtobj_union": 20.0}
    (out / "eval" / "mined" / "eval_results.json").write_text(json.dumps(
        {"parts_ar": {"AR@200": 12.5, **mined_ar}, "parts_nmi_ari": {"NMI": 30.0, "ARI": 10.0}}))
    (out / "self_train" / "round_0").mkdir(parents=True)
    (out / "self_train" / "round_0" / "round.json").write_text(json.dumps(
        {"eval": {"parts_ar": {"AR@200": 40.0}, "parts_miou": {"mIoU": 33.3}, "fit": {"mean_best_iou": 0.714}},
         "labels": {"eval": {"parts_ar": {"AR@200-gtobj_union": 26.25}}}}))
    (out / "eval" / "mined_pred").mkdir(parents=True)
    (out / "eval" / "mined_pred" / "eval_results.json").write_text(json.dumps(
        {"parts_ar": {"AR@200": 7.5}, "parts_miou": {"mIoU": 5.0}}))
    rows = dict(collect_results(str(out)))
    assert rows["mined parts only (no learning)"]["AR@200-pred"] == 7.5
    assert rows["mined parts only (no learning)"]["NMI"] == 30.0
    # a class-agnostic round has no clusters: its mIoU is undefined, not the evaluator's 0
    assert "mIoU" not in rows["self-training round 1"] and rows["self-training round 1"]["AR@200"] == 40.0
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\noutro\n")
    import matplotlib.axes

    drawn, real_plot = {}, matplotlib.axes.Axes.plot

    def record(self, x, y, *args, label=None, **kwargs):
        drawn[label] = (list(x), list(y))
        return real_plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    text = write_demo_report(str(out), {"a": "skipped", "b": 3.0}, readme=str(readme))
    assert "steps (as last run, timings.json): b 3s" in text
    assert "| mined parts only (no learning) | 7.5 | 5.0 | 20.0 | n/a | 30.0 | 10.0 |" in text
    # a crop model's parts depend on their owners: no predicted-object AR without its own evaluation;
    # the fit (2 decimals) and the AR of the round's own training labels are shown
    assert "| self-training round 1 | n/a | n/a | n/a | n/a | n/a | n/a | 0.71 | 26.2 |" in text
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("outro\n") and "old" not in new and "| 26.2 |" in new
    # AR-vs-k draws the one row with AR at every k (the others lack some k), and the report shows it with
    # the table's rows as cells
    assert drawn == {"mined parts only (no learning)": ([1, 10, 50, 100, 200], [2.0, 8.0, 14.0, 17.0, 20.0])}
    from PIL import Image

    with Image.open(out / "ar_vs_k.png") as im:
        assert im.format == "PNG" and im.size == (550, 350)
    report = (out / "report.html").read_text()
    assert "<td>mined parts only (no learning)</td><td>7.5</td><td>5.0</td><td>20.0</td><td>n/a</td>" in report
    assert "<td>self-training round 1</td>" in report and "<img src='ar_vs_k.png'>" in report
    assert "contact_sheet.png" not in report  # a figure is linked only when it exists
    assert not update_readme(str(tmp_path / "missing.md"), "x")


def test_demo_steps_reuse_a_teacher_and_pass_mining_options():
    steps = {s.name: s for s in build_demo_steps("OUT2", teacher_dir="T", mining_opts=("MODEL.WEIGHTS", "P.pth"))}
    assert "instance_teacher" not in steps
    w = lambda s: steps[s].argv[steps[s].argv.index("MODEL.WEIGHTS") + 1]  # noqa: E731
    assert w("proposal") == os.path.join("T", "model_final.pth") and w("mine_train") == "P.pth"
    assert steps["mine_train"].done_file == os.path.join("OUT2", "mined_train", "manifest.json")


def test_part_awareness_table_joins_probes_and_pipelines(tmp_path):
    from part_distill.drivers.part_awareness_lab import (IMAGENET_LABEL, build_lab_steps, particle_label,
                                                        write_lab_table)
    from part_distill.probes.report import write_report

    out, demo = tmp_path / "lab", tmp_path / "demo"
    steps = {s.name: s for s in build_lab_steps(str(out), str(demo), iterations=2)}
    last = os.path.join(str(out), "particle", "iter_1", "model_final.pth")
    assert steps["particle_mine_train"].argv[steps["particle_mine_train"].argv.index("MODEL.WEIGHTS") + 1] == last
    assert steps["particle_proposal"].argv[steps["particle_proposal"].argv.index("MODEL.WEIGHTS") + 1] == \
        os.path.join(str(demo), "instance_teacher", "model_final.pth")
    assert f"{particle_label(0)}={os.path.join(str(out), 'particle', 'iter_0', 'model_final.pth')}" in \
        steps["probes"].argv
    (out / "probes").mkdir(parents=True)
    write_report(str(out / "probes"), [
        {"label": IMAGENET_LABEL, "AR@1": 2.5, "AR@10": 16.0, "linear_mIoU": 30.0, "retrieval_mAP": 20.0},
        {"label": particle_label(1), "AR@1": 3.0, "AR@10": 18.0, "linear_mIoU": 31.0, "retrieval_mAP": 22.0}])
    for base, ar, miou in ((demo, 16.1, 21.8), (out / "pipeline_particle", 18.2, 23.0)):
        (base / "eval" / "mined").mkdir(parents=True)
        (base / "eval" / "mined" / "eval_results.json").write_text(json.dumps({"parts_ar": {"AR@10-gtobj_union": ar}}))
        (base / "distill").mkdir(parents=True)
        (base / "distill" / "eval_results.json").write_text(json.dumps(
            {"parts_miou": {"mIoU": miou}, "parts_nmi_ari": {"NMI": 12.0, "ARI": 9.0}}))
    text = write_lab_table(str(out), str(demo), iterations=2)
    assert f"| {IMAGENET_LABEL} | 2.50 | 16.00 | 30.00 | 20.00 | 16.10 | 21.80 | 12.00 | 9.00 |" in text
    # iteration 1 was not probed and has no pipeline run: dashes, not zeros
    assert f"| {particle_label(0)} | — | — | — | — | — | — | — | — |" in text
    assert f"| {particle_label(1)} | 3.00 | 18.00 | 31.00 | 22.00 | 18.20 | 23.00 | 12.00 | 9.00 |" in text


def test_per_class_plot_reads_gt_object_metrics_only(tmp_path, monkeypatch):
    from part_distill.drivers import demo

    seen = {}
    monkeypatch.setattr("matplotlib.axes.Axes.bar", lambda self, x, y, **k: seen.update(zip(x, y)))
    demo._plot_class_miou("m", {"mIoU-car": 10.0, "mIoU-car-pred": 3.0, "mIoU": 5.0}, str(tmp_path / "c.png"))
    assert seen == {"car": 10.0}


def _load_tool(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failed_demo_run_reports_finished_steps_then_resumes(tmp_path, monkeypatch):
    run_demo = _load_tool("run_demo")
    out, counter = tmp_path / "demo", tmp_path / "count.txt"
    distill = out / "distill" / "eval_results.json"
    metrics = {"parts_ar": {"AR@200-gtobj_union": 50.0}, "parts_miou": {"mIoU": 25.0}}
    write = _script(tmp_path, "write.py", "import os, sys\nopen(sys.argv[1], 'a').write('x')\n"
                    "os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)\n"
                    "open(sys.argv[2], 'w').write(sys.argv[3])\n")
    bad = _script(tmp_path, "bad.py", "import sys\nprint('boom'); sys.exit(3)\n")
    predictions = out / "overlays" / "predictions.json"
    steps = [Step("distill", [write, str(counter), str(distill), json.dumps(metrics)], str(distill)),
             Step("overlays", [bad], str(predictions))]
    monkeypatch.setattr(run_demo, "build_demo_steps", lambda output, num_gpus=0: steps)
    monkeypatch.chdir(tmp_path)  # the driver writes the results block of ./README.md
    readme = tmp_path / "README.md"
    readme.write_text("<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\n")
    with pytest.raises(SystemExit) as exit_:
        run_demo.main(["--output", str(out)])
    assert "step overlays failed" in str(exit_.value.code)  # sys.exit(message): exit status 1
    row = "| final distillation (stage 4) | n/a | n/a | 50.0 | 25.0 | n/a | n/a |"
    failed = f"step overlays failed (log: {out / 'logs' / 'overlays.log'})"
    results = (out / "results.md").read_text()
    assert row in results and failed in results.splitlines()[2]
    report = (out / "report.html").read_text()
    assert "<td>final distillation (stage 4)</td><td>n/a</td><td>n/a</td><td>50.0</td><td>25.0</td>" in report
    assert failed in report and report.index(failed) < report.index("final distillation")
    assert "old" in readme.read_text()  # a partial table never replaces the README's
    # the re-run skips the finished step and runs the failed one
    steps[1] = Step("overlays", [write, str(counter), str(predictions), "{}"], str(predictions))
    run_demo.main(["--output", str(out)])
    assert counter.read_text() == "xx"
    results = (out / "results.md").read_text()
    assert row in results and "failed" not in results
    assert "old" not in readme.read_text() and row in readme.read_text()
