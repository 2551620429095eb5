"""The train stage through its entrypoint: real Ray Train, real DeepSpeed (CPU, gloo), 2 workers, tiny models,
on labels of the tiny teacher in the label contract.

Here: a sequence-parallel run (ZeRO-2, full fine-tuning) whose workers are killed mid-run, which is then stopped
with Ctrl-C and finished by the same command as a Ray job; then on its root a refused change and a start-over with
ZeRO-1, gradient accumulation, gradient checkpointing and a merged LoRA student. Full fine-tuning and LoRA under ZeRO-3 with CPU offload, and held-out top-1 agreement, are
asserted in tests/test_chain.py, whose teacher is first SFT-trained: with the random tiny teacher used here
agreement moves by less than run-to-run noise (measured 1.4 % -> 1.6 %), while the held-out KL to the teacher
falls reliably."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_job
from labels_check import write_labels
from ray_head import submit


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """96 rows labeled by the tiny teacher: its transformers forward pass over the corpus's responses, written in the
    label contract (tests/labels_check.py); the label stage's own engine runs are tested in tests/test_label_stage.py
    and tests/test_chain.py."""
    root = tmp_path_factory.mktemp("train-run")
    write_labels(root, 96)
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


def test_a_worker_group_the_local_ray_cannot_hold_is_refused(labeled, tmp_path):
    """Ray Train would wait for a third worker's CPU without end, and an embedded local Ray never grows: the run
    stops with one sentence before any work: no Ray is started (its CPUs are cluster.num_cpus), no student built."""
    run_root = tmp_path / "run"
    run_root.mkdir()
    (run_root / "labels").symlink_to(labeled / "labels")
    proc = run_job("train.py", "debug=tiny", f"paths.run_root={run_root}", "train.num_workers=3",
                   "train.cpus_per_worker=1", "cluster.num_cpus=2", check=False, timeout=300)
    assert proc.returncode == 2
    assert "3 workers of 1 CPU need 3 CPUs, but the Ray cluster has 2 CPUs" in proc.stderr
    log = (run_root / "logs" / "train.log").read_text()
    assert "Traceback" not in proc.stderr and "error: train.num_workers=3" in log
    assert "Started a local Ray instance" not in log  # cluster.num_cpus is known before Ray starts: none is started
    assert not (run_root / "student" / "metrics.jsonl").exists() and not (run_root / "models").exists()


def _train_workers(pid: int) -> list:
    """The Ray Train worker processes under a driver started with an embedded local Ray."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def _registered_checkpoint_step(storage: Path) -> int:
    """The step of the newest checkpoint Ray Train's controller has registered (and would resume from)."""
    snapshot = storage / "train" / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return 0
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # caught mid-write
        return 0
    return latest["metrics"]["step"] if latest else 0


SP = 2
# the run the tests below share: full fine-tuning (ZeRO-2, the default) of a two-worker Ulysses sequence-parallel group
RUN = ["debug=tiny", "train.method=full", "train.lr=1e-2", "train.epochs=3", "train.checkpoint_every=6",
       f"train.sequence_parallel_size={SP}"]


@pytest.fixture(scope="module")
def killed_run(labeled, tmp_path_factory, ray_head):
    """A training run whose workers are SIGKILLed mid-run (once Ray Train has registered a checkpoint) and which
    recovers; once the new worker group has taken a few steps, the whole run is stopped with Ctrl-C (SIGINT to its
    process group, as a terminal sends it), and the same command, submitted as a Ray job to the real head (conftest's
    `ray_head`), finishes it from its newest checkpoint. Returns (run root, the first run's output, the step of the
    checkpoint registered before the kill, (exit code, seconds) of the Ctrl-C, the job)."""
    import subprocess
    import sys
    import threading
    import time

    from conftest import REPO, interrupt_like_a_terminal

    run_root = tmp_path_factory.mktemp("train-killed")
    for sub in ("labels", "models"):
        (run_root / sub).symlink_to(labeled / sub)
    metrics = run_root / "student" / "metrics.jsonl"
    cmd = [sys.executable, str(REPO / "ray_jobs" / "train.py"), *RUN, f"paths.run_root={run_root}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    try:
        deadline = time.monotonic() + 300
        while not (_registered_checkpoint_step(run_root / "train") >= 6 and max(_steps(run_root), default=0) >= 8):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended or stalled before the kill"
            time.sleep(0.2)
        registered, before = _registered_checkpoint_step(run_root / "train"), logged()
        victims = _train_workers(proc.pid)
        assert victims
        for victim in victims:  # every match is under this driver; losing any one fails the worker group
            victim.kill()
        while logged() < before + 4:  # the replacement group trains on
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.1)
        assert max(_steps(run_root)) < 3 * 9 * SP, "the run finished before Ctrl-C; give it more steps"
    finally:
        interrupted = interrupt_like_a_terminal(proc, lines)
    time.sleep(0.5)  # the reader thread's last lines
    job = submit(ray_head, "ray_jobs/train.py", *RUN, f"paths.run_root={run_root}")
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-4000:]
    return run_root, "".join(lines), registered, interrupted, job


def test_a_killed_worker_group_is_replaced_and_resumes_from_the_checkpoint(killed_run):
    """SIGKILL the training workers mid-run: Ray Train replaces the worker group and the new group resumes from the
    newest registered checkpoint (not step 0); Ctrl-C then stops the run within 30 s, leaving nothing behind, and
    the same command as a Ray job finishes every step from the newest checkpoint. The two workers form one Ulysses
    sequence-parallel group, so this is also the sequence-parallel path through Ray Train end to end. Full
    fine-tuning and LoRA under ZeRO-3 with CPU offload are trained by tests/test_chain.py (its SFT teacher and its
    KD student)."""
    import re

    run_root, out, registered, (code, took), job = killed_run
    assert code == 130 and took < 30, (code, took, out[-3000:])
    assert "train: interrupted (SIGINT)" in out and "Traceback" not in out, out[-3000:]
    assert re.search(r"train: resuming from the checkpoint of step ([1-9]\d*)", job.stdout), job.stdout[-3000:]
    metrics = run_root / "student" / "metrics.jsonl"
    # Ray Train saw the loss and recovered: its own log lines are in the run's log, not on the terminal
    log = (run_root / "logs" / "train.log").read_text()
    assert "Training failed due to worker errors" in log and "Training failed" not in out, out[-4000:]
    resumed = [int(m) for m in re.findall(r"resuming from the checkpoint of step (\d+)", out)]
    assert resumed and resumed[0] >= registered, out[-4000:]
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    restart = next(i for i in range(1, len(records)) if records[i]["step"] <= records[i - 1]["step"])
    assert records[restart]["step"] == resumed[0] + 1  # the new group's first step follows the checkpoint
    steps = _steps(run_root)
    # 68 training rows / 2 workers / 4 = 9 micro-batches a worker an epoch; an SP group steps through both workers'
    per_epoch = 9 * SP
    assert sorted(steps) == list(range(1, 3 * per_epoch + 1))
    kd = [steps[s]["kd"] for s in sorted(steps)]
    assert np.mean(kd[-per_epoch:]) < np.mean(kd[:per_epoch]), kd
    evals = [json.loads(x) for x in (run_root / "student" / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 3 * per_epoch
    assert evals[-1]["kl_to_teacher"] < evals[0]["kl_to_teacher"], evals  # held-out rows
    # the saved student loads and differs from the base it started from
    import torch

    probe = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert not torch.allclose(load_student(run_root, "base")(probe).logits,
                                  load_student(run_root, "full")(probe).logits)
    lineage = json.loads((run_root / "student" / "lineage.json").read_text())
    assert lineage["labels_fingerprint"] and lineage["deepspeed"]["zero_optimization"]["stage"] == 2
    assert lineage["train"]["sequence_parallel_size"] == SP
    assert (run_root / "student" / "loss.png").stat().st_size > 0


def test_a_changed_run_is_refused(killed_run):
    """Another ZeRO stage on those checkpoints is refused before any work, naming what changed (DeepSpeed would fail on
    them); train.overwrite=true starting over on them is the online run's (below)."""
    run_root = killed_run[0]
    lines = len((run_root / "student" / "metrics.jsonl").read_text().splitlines())
    proc = run_job("train.py", *RUN, f"paths.run_root={run_root}", "deepspeed=zero3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds checkpoints of a run with a different config (changed: deepspeed)" in proc.stderr
    assert len((run_root / "student" / "metrics.jsonl").read_text().splitlines()) == lines


def test_the_steps_display_ends_at_the_last_step_written(tmp_path, capsys):
    """The driver's steps display follows the metrics log that rank 0 appends to; steps written in the last moment
    before fit() returns must still count (the display read the log once a second and ended short of them)."""
    from pipeline.train.stage import _steps_progress

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # an earlier run's step: not this run's
    with _steps_progress(metrics, total=3):
        with metrics.open("a") as f:
            for step in (1, 2, 3):
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    assert "train: steps: 100%" in capsys.readouterr().err


def test_online_terms_and_galore_train_under_ray_train(killed_run, ray_head):
    """Every online term at once (loss=kd_online: top-k KD on the labels, full-vocabulary KD, hidden states through a
    learned projection from the student's width 64 to the teacher's 128, attention maps of 2 student heads against 4
    teacher heads, averaged) with the teacher partitioned by ZeRO-3 across 2 Ray Train workers, and GaLore (rank 8 =
    width/8, its update at full scale so that 36 steps move the attention) training the full student without ZeRO
    partitioning. Each term is logged and falls; the projections are saved beside a student that transformers loads
    without them, and reload. It runs on the killed run's root (after the tests above) with train.overwrite=true:
    those checkpoints and outputs are removed and the run starts over. Its driver joins the session's Ray head as on a
    cluster (conftest's `start_job`)."""
    from pipeline.train.online import load_projections

    run_root = killed_run[0]
    old = {p.name for p in (run_root / "train" / "train").glob("checkpoint_*") if p.is_dir()}
    assert old
    proc = run_job("train.py", "debug=tiny", f"paths.run_root={run_root}", "loss=kd_online", "train.method=full",
                   "train.optimizer=galore", "train.galore.rank=8", "train.galore.update_proj_gap=10",
                   "train.galore.scale=1", "train.overwrite=true",
                   "deepspeed=none", "train.teacher_placement=zero3", "train.epochs=4", "train.lr=2e-2",
                   "train.checkpoint_every=100", head=ray_head)
    assert "train: starting over (train.overwrite=true; changed: " in proc.stdout, proc.stdout[-3000:]
    assert not old & {p.name for p in (run_root / "train" / "train").glob("checkpoint_*") if p.is_dir()}
    assert "online teacher" in proc.stdout and "(zero3)" in proc.stdout, proc.stdout[-3000:]
    held = float(proc.stdout.split("(zero3): ")[1].split(" MiB")[0])
    teacher_mib = sum(f.stat().st_size for f in (run_root / "models" / "tiny-teacher").glob("*.safetensors")) / 2**20
    assert held < 0.6 * teacher_mib, (held, teacher_mib)  # each worker holds about half of the partitioned teacher
    lines = (run_root / "student" / "metrics.jsonl").read_text().splitlines()
    steps = _steps(run_root)
    assert sorted(steps) == list(range(1, 4 * 9 + 1)) and len(lines) == len(steps)  # none of the killed run's left
    first, last = [steps[s] for s in sorted(steps)[:5]], [steps[s] for s in sorted(steps)[-5:]]
    for term in ("offline", "online_kd", "hidden", "attention"):  # measured: 0.61, 0.71, 0.61 and 0.93 of the start
        before, after = np.mean([r[term] for r in first]), np.mean([r[term] for r in last])
        assert after < 0.97 * before, (term, before, after)
    student = run_root / "student"
    model = load_student(run_root, "full")  # the projections are not among its weights
    from safetensors import safe_open

    with safe_open(str(student / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "projection" in k]
    projections, pairs = load_projections(student)
    assert pairs == [(0, 1)] and projections[0].weight.shape == (128, 64)
    assert model.config.hidden_size == 64
