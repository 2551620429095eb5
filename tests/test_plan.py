"""`ray_jobs/plan.py` and the presets it checks: every shipped experiment plans, the GPU presets give every stage
GPUs, and a preset that contradicts itself or the cluster is refused with one sentence before any work.

No model is loaded and no Ray starts: the plan is arithmetic on the composed config (`conf/plan/` holds the
throughput assumptions and their sources).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, REPO
from pipeline.config import training_precision, train_stage
from pipeline.errors import ConfigError
from pipeline.chain import plan_of

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GPU_PRESETS = ["qwen72b_to_7b", "qwen7b_to_0_5b"]


def _plain(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["paths.root=/tmp/ray-distill-plan", *overrides])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain


def _plan_job(*overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "plan.py"), *overrides,
                           "hydra.run.dir=/tmp/ray-distill-plan/hydra"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_plans_and_fits(experiment):
    plan = plan_of(_plain(f"experiment={experiment}"))
    assert [s["stage"] for s in plan["stages"]][-1] == "serve"
    for stage in plan["stages"]:
        for ask in stage["asks"]:
            assert ask["fits"] is not None and ask["fits"] >= ask["min"], (stage["stage"], ask)


@pytest.mark.parametrize("experiment", GPU_PRESETS)
def test_gpu_presets_give_every_stage_gpus(experiment):
    plain = _plain(f"experiment={experiment}")
    plan = {s["stage"]: s for s in plan_of(plain)["stages"]}
    assert set(plan) == {"label", "train", "quantize", "evaluate", "serve"}
    for name, stage in plan.items():
        assert stage["asks"] and all(ask["gpus"] > 0 for ask in stage["asks"]), name
    tp = plain["teacher"]["tensor_parallel_size"]
    assert plan["label"]["asks"][0]["gpus"] == tp  # interpolated from the teacher, not repeated
    assert plain["label"]["num_gpus_per_actor"] == tp
    assert plan["evaluate"]["asks"][0]["gpus"] == tp and plan["evaluate"]["asks"][1]["gpus"] == 1
    stage = train_stage(plain)
    assert stage.train.use_gpu and training_precision(stage.student, stage.train.use_gpu) == "bf16"
    # the ZeRO stage fits the student: a full 7B shards everything (ZeRO-3); the small student shards less
    zero = stage.deepspeed["zero_optimization"]["stage"]
    assert zero == (3 if stage.student.num_parameters > 5e9 and stage.train.method == "full" else 2)
    gpu = plain["plan"]["gpu_types"][next(n["gpu_type"] for n in plain["cluster"]["node_types"].values() if n["gpus"])]
    for s in plan.values():
        for ask in s["asks"]:
            assert ask["gpu_memory_gb"] is None or ask["gpu_memory_gb"] <= gpu["memory_gb"], (s["stage"], ask)


def test_changing_the_teachers_tensor_parallelism_moves_its_actors_gpus():
    plain = _plain("experiment=qwen72b_to_7b", "teacher.tensor_parallel_size=8")
    label = plan_of(plain)["stages"][0]
    assert label["asks"][0]["gpus"] == 8 and label["asks"][0]["fits"] == 4  # one actor per 8-GPU node


def test_the_reference_plan_prints_and_its_json_adds_up():
    text = _plan_job("experiment=qwen72b_to_7b", "plan.corpus_rows=100000").stdout
    assert "qwen72b_to_7b, 100000 corpus rows" in text and "GPU-hours" in text
    for stage in ("label", "train", "quantize", "evaluate", "serve"):
        assert f"  {stage} " in text
    plan = json.loads(_plan_job("experiment=qwen72b_to_7b", "plan.corpus_rows=100000", "plan.format=json").stdout)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["label"]["estimate"]["tokens_scored"] == 100000 * 512  # responses capped at label.max_response_tokens
    total = plan["total"]
    assert total["gpu_hours"] == pytest.approx(sum(s["estimate"].get("gpu_hours") or 0 for s in plan["stages"]))
    assert total["cost_usd"] == pytest.approx(total["gpu_hours"] * total["price_per_gpu_hour"])
    assert total["storage_gb"] > stages["label"]["estimate"]["storage_gb"] > 1  # labels are gigabytes, not bytes


def test_estimates_follow_the_work_and_the_pool():
    """Twice the rows take twice the hours; twice the teacher actors half the hours at the same GPU-hours; score mode
    (prefill only) is faster than generating the responses."""
    def label(*overrides):
        return plan_of(_plain("experiment=qwen72b_to_7b", *overrides))["stages"][0]["estimate"]

    base = label("plan.corpus_rows=100000")
    assert label("plan.corpus_rows=200000")["hours"] == pytest.approx(2 * base["hours"])
    half = label("plan.corpus_rows=100000", "label.concurrency=[1,4]")
    assert half["hours"] == pytest.approx(2 * base["hours"]) and half["gpu_hours"] == pytest.approx(base["gpu_hours"])
    assert label("plan.corpus_rows=100000", "label.mode=score")["hours"] < base["hours"] / 2


@pytest.mark.parametrize("overrides,message", [
    (["label.num_gpus_per_actor=1"], "teacher.tensor_parallel_size=4 spreads the teacher over 4 GPUs per actor, but "
                                     "label.num_gpus_per_actor=1"),
    (["train.use_gpu=false"], "student.dtype=bfloat16 trains in bf16 on GPUs only"),
    (["evaluate.use_gpu=false"], "has tensor_parallel_size=4, which needs GPUs, but evaluate.use_gpu=false"),
    (["teacher.tensor_parallel_size=2"], "The label stage cannot start: label.concurrency asks for 1 teacher actor "
                                         "of 8 CPUs and 2 GPUs each, but each needs 81 GB on every GPU"),
    (["train.num_workers=40"], "The train stage cannot start: train.num_workers asks for 40 workers of 8 CPUs and 1 "
                               "GPU each, but the cluster holds at most 32 at once"),
    (["deepspeed=zero2", "train.num_workers=1"], "each needs 122 GB on every GPU it uses and the largest GPU has 80 GB"),
    (["teacher.tensor_parallel_size=16"], "no node type has 16 GPUs"),
])
def test_a_contradictory_preset_is_refused_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        plan_of(_plain("experiment=qwen72b_to_7b", *overrides))
    assert "\n" not in str(info.value)
    proc = _plan_job("experiment=qwen72b_to_7b", *overrides, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_a_stage_entrypoint_refuses_a_contradictory_preset_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "label.py"), "experiment=qwen72b_to_7b",
                           "label.num_gpus_per_actor=1", f"paths.run_root={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "label.num_gpus_per_actor=1" in proc.stderr
    assert not (tmp_path / "labels").exists() and not (tmp_path / "data").exists()


def test_run_py_checks_the_plan_before_its_first_stage(tmp_path):
    """The chain refuses a run whose later stage cannot fit (here: training workers this machine cannot hold)
    before its first stage starts."""
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "run.py"), "debug=tiny",
                           f"paths.run_root={tmp_path}", "cluster.num_cpus=2", "train.cpus_per_worker=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: The train stage cannot start: train.num_workers asks for 2 workers of 2 CPUs each, but the cluster "
        "holds at most 1 at once; lower the ask or describe a larger cluster in cluster.node_types.")
    assert "run: label runs" not in proc.stdout and not (tmp_path / "chain.json").exists()
