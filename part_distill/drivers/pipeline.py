"""Run the stages of PartDistillation in order, skipping the ones already finished.

Each step is one of the user-facing commands (``tools/train_net.py``, ``tools/mine_parts.py``,
...) run as a subprocess with the same interpreter, exactly as a user would type it; its log goes
to ``<output>/logs/<step>.log``. A step is finished when the file it promises exists (a
``model_final.pth``, a store's ``manifest.json``, an evaluation's ``eval_results.json``); those files
are written atomically by the commands themselves, so a killed pipeline resumes at the first
unfinished step, and steps that can resume internally (training, mining) are given ``--resume``.
"""
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

from ..utils.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["Step", "run_steps", "StepFailed", "record_timings", "read_timings"]


class StepFailed(RuntimeError):
    """A step exited non-zero or without its result.

    ``step``/``log_path`` name it and ``timings`` holds the steps before it (``run_steps``' format),
    so a driver can still report the finished work before exiting.
    """

    def __init__(self, message, step, log_path, timings):
        super().__init__(message)
        self.step, self.log_path, self.timings = step, log_path, timings


@dataclass
class Step:
    name: str  # short id, also the log file name
    argv: List[str]  # script path + arguments, run with the current interpreter
    done_file: str  # the step is finished when this file exists
    description: str = ""
    env: dict = field(default_factory=dict)


def run_steps(steps, log_dir, python=sys.executable, cwd=None, echo=print):
    """Run ``steps`` in order; returns {name: "skipped" | seconds}. Raises StepFailed on error."""
    os.makedirs(log_dir, exist_ok=True)
    timings = {}
    for i, step in enumerate(steps, 1):
        tag = f"[{i}/{len(steps)}] {step.name}"
        if os.path.exists(step.done_file):
            echo(f"{tag}: already done ({step.done_file})")
            timings[step.name] = "skipped"
            continue
        log_path = os.path.join(log_dir, f"{step.name}.log")
        echo(f"{tag}: {step.description or ' '.join(step.argv)}  (log: {log_path})")
        start = time.perf_counter()
        env = dict(os.environ, **step.env)
        with open(log_path, "a") as log:
            log.write(f"\n$ {python} {' '.join(step.argv)}\n")
            log.flush()
            proc = subprocess.run([python, *step.argv], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(step.done_file):
            tail = _tail(log_path)
            raise StepFailed(
                f"step {step.name} failed (exit {proc.returncode}) after {elapsed:.0f}s; "
                f"expected {step.done_file}. Last log lines:\n{tail}", step.name, log_path, timings)
        timings[step.name] = elapsed
        echo(f"{tag}: done in {elapsed:.0f}s")
    return timings


def _tail(path, n=25):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


TIMINGS_FILE = "timings.json"


def read_timings(out):
    """{step: seconds} of every step a driver ran under ``out`` (``record_timings``), {} if none."""
    path = os.path.join(out, TIMINGS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record_timings(out, timings):
    """Merge the seconds of the steps run now (``run_steps``' result) into ``<out>/timings.json``; steps
    skipped now keep the time of the run that did them. Returns the merged dict."""
    merged = read_timings(out)
    merged.update({k: v for k, v in timings.items() if v != "skipped"})
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, TIMINGS_FILE), merged, indent=1, sort_keys=True)
    return merged
