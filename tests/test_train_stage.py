"""The train stage through its entrypoint: real Ray Train, real DeepSpeed (CPU, gloo), 2 workers, tiny models,
on labels written by the real label stage.

Held-out top-1 agreement is not asserted yet: a 1-layer, 64-wide random student imitating a random 2-layer
teacher moves it by less than run-to-run noise in a test-sized run (measured 1.6 % -> 2.0 %). It needs a
teacher with learnable structure (the SFT-trained demo teacher of the evaluate issue)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_job

ALL_LINEAR = "train.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """96 rows labeled by the tiny teacher."""
    root = tmp_path_factory.mktemp("train-run")
    run_job("label.py", "debug=tiny", f"paths.run_root={root}", "data.build.num_rows=96")
    return root


def load_student(root: Path, method: str):
    import torch
    from transformers import AutoModelForCausalLM

    if method == "base":
        return AutoModelForCausalLM.from_pretrained(root / "models" / "tiny-student", dtype=torch.float32).eval()
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(root / "student" / "model", dtype=torch.float32).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(load_student(root, "base"), root / "student" / "adapter").eval()


def _steps(root: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (root / "student" / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("method,zero,extra", [("lora", "zero2", [ALL_LINEAR]), ("full", "zero3", ["train.lr=1e-2"])])
def test_two_workers_distil_the_student(labeled, method, zero, extra, tmp_path):
    root = labeled
    run_root = tmp_path / "run"
    # share the labels and models, keep this run's student and checkpoints apart
    (run_root).mkdir()
    for sub in ("labels", "models"):
        (run_root / sub).symlink_to(root / sub)
    run_job("train.py", "debug=tiny", f"paths.run_root={run_root}", f"train.method={method}",
            f"deepspeed={zero}", "train.epochs=6", *extra)
    steps = _steps(run_root)
    assert max(steps) == 6 * 9  # 96 rows, 28 held out: 68 / 2 workers = 34 each / micro-batch 4 = 9 steps an epoch
    kd_first = np.mean([steps[s]["kd"] for s in range(1, 10)])
    kd_last = np.mean([steps[s]["kd"] for s in range(46, 55)])
    if method == "full":  # measured: epoch-mean KD 0.688 -> 0.636 over 6 epochs
        assert kd_last < 0.97 * kd_first, (kd_first, kd_last)
    else:  # LoRA on a random base moves slowly (measured 0.704 -> 0.700): it must not get worse, and it trained
        assert kd_last <= kd_first * 1.005, (kd_first, kd_last)
        trained = load_student(run_root, "lora")
        assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    # the saved student loads and differs from the base it started from
    import torch

    probe = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert not torch.allclose(load_student(run_root, "base")(probe).logits,
                                  load_student(run_root, method)(probe).logits)
    lineage = json.loads((run_root / "student" / "lineage.json").read_text())
    assert lineage["labels_fingerprint"] and lineage["deepspeed"]["zero_optimization"]["stage"] == int(zero[-1])
    assert (run_root / "student" / "loss.png").stat().st_size > 0

    # the same command again resumes from the final checkpoint instead of training from scratch
    lines = len((run_root / "student" / "metrics.jsonl").read_text().splitlines())
    run_job("train.py", "debug=tiny", f"paths.run_root={run_root}", f"train.method={method}",
            f"deepspeed={zero}", "train.epochs=6", *extra)
    assert len((run_root / "student" / "metrics.jsonl").read_text().splitlines()) == lines


def test_labels_from_another_tokenizer_are_refused(labeled, tmp_path):
    root = labeled
    run_root = tmp_path / "run"
    run_root.mkdir()
    (run_root / "labels").symlink_to(root / "labels")
    # a student whose tokenizer was trained with a different vocabulary size
    proc = run_job("train.py", "debug=tiny", f"paths.run_root={run_root}", "student.build.tokenizer_vocab_size=384",
                   check=False)
    assert proc.returncode == 2
    assert "different tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def _train_workers(pid: int) -> list:
    """The Ray Train worker processes under a driver started with an embedded local Ray."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def test_sequence_parallel_run_survives_a_killed_worker(labeled, tmp_path):
    """Ulysses SP (2 workers split each sequence) end to end; SIGKILL one worker mid-run: Ray Train starts a
    new worker group from the newest checkpoint and the run finishes every step (loss/gradient equality of
    the split itself is tests/test_sequence_parallel.py)."""
    import subprocess
    import sys
    import time

    from conftest import REPO

    run_root = tmp_path / "run"
    run_root.mkdir()
    for sub in ("labels", "models"):
        (run_root / sub).symlink_to(labeled / sub)
    metrics = run_root / "student" / "metrics.jsonl"
    cmd = [sys.executable, str(REPO / "ray_jobs" / "train.py"), "debug=tiny", f"paths.run_root={run_root}",
           "train.sequence_parallel_size=2", "train.method=full", "train.lr=1e-2", "train.epochs=2",
           "train.checkpoint_every=6"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and max(_steps(run_root), default=0) >= 8):  # past the step-6 checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, "training ended or stalled before the kill"
            time.sleep(0.5)
        victims = _train_workers(proc.pid)
        assert len(victims) == 2
        victims[-1].kill()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    resumed = [int(x) for x in re.findall(r"train: resuming from the checkpoint of step (\d+)", out)]
    assert resumed and resumed[0] % 6 == 0 and resumed[0] >= 6, out[-4000:]
    steps = _steps(run_root)
    assert sorted(steps) == list(range(1, 37))  # 68 training rows / 2 workers / 4 = 9 micro-batches each, × 2 ranks, × 2
    kd = [steps[s]["kd"] for s in range(1, 37)]
    assert np.mean(kd[18:]) < np.mean(kd[:18]), kd  # measured 0.688 -> 0.665
    assert (run_root / "student" / "model" / "config.json").exists()
