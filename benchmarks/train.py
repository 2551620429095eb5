"""Train-stage benchmark: P4 (Ray Train + DeepSpeed vs a plain torch loop) and P5 (KD step vs CE step).

    python benchmarks/train.py [--rows 256] [--steps 40] [--root /tmp/bench-train]

One run, one machine, one student (a 4-layer, 256-wide Qwen2 on the tiny tokenizer, full fine-tune, fp32),
the same labels (written by the label stage from the tiny teacher) and the same global batch of 16. Each part
runs in its own process. JSON lines go to stdout.

P5 times KD and CE-only steps interleaved in one process (medians), so the machine's drift falls on both;
peak memory comes from a separate process for each.

P4 is read with one Ray Train worker holding every core (how a single machine trains: one process, all cores,
like the plain loop); two data-parallel workers of one core each (DeepSpeed's all-reduce over gloo, what a
multi-GPU run does) are measured in the same run and reported in `detail`. The embedded Ray gets one logical
CPU more than the machine has, so Ray Data's read tasks can run beside workers that hold every core.

`detail.one_core` repeats P4 with one compute thread on each side (a one-CPU worker vs the plain loop with one
thread), which leaves Ray's own processes (raylet, GCS, Ray Train's controller and helper actors, Ray Data's
coordinator) a core of their own: it separates what Ray Train + DeepSpeed cost per step from what Ray's
processes take from a step that holds every core.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import parts  # noqa: E402

STUDENT = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768, seed=1)
GLOBAL_BATCH = 16
CPUS = os.cpu_count() or 1
# Ray Train setups: name → (workers, CPUs per worker); each worker's micro-batch is GLOBAL_BATCH / workers
SETUPS = {"one_worker": (1, CPUS), "two_workers": (2, max(1, CPUS // 2)), "one_core": (1, 1)}


def overrides(args, setup: str = "one_worker") -> list[str]:
    workers, cpus = SETUPS[setup]
    return ["debug=tiny", f"paths.run_root={args.root}", f"data.build.num_rows={args.rows}",
            "label.max_response_tokens=48", "train.method=full", f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus}", f"cluster.num_cpus={CPUS + 1}",
            f"train.micro_batch_size={GLOBAL_BATCH // workers}", f"train.max_steps={args.steps}", "train.epochs=100",
            f"train.checkpoint_every={args.steps}", "train.lr=1e-4",
            *[f"student.build.{k}={v}" for k, v in STUDENT.items()]]


def compose(args, setup: str = "one_worker"):
    return parts.compose(overrides(args, setup))


def part_labels(args) -> dict:
    from pipeline.label.stage import run

    return run(compose(args))


def part_ray_train(args, setup: str) -> dict:
    import shutil

    from pipeline.train.stage import run

    for sub in ("student", "train"):
        shutil.rmtree(args.root / sub, ignore_errors=True)
    run(compose(args, setup))
    records = [json.loads(x) for x in (args.root / "student" / "metrics.jsonl").read_text().splitlines()]
    steady = records[5:]  # leave out start-up steps (process group, first batches, allocator warm-up)
    return {"tok_s": sum(r["tokens_per_s"] for r in steady) / len(steady), "steps": len(records)}


def _plain_batches(args, n: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import train_stage
    from pipeline.data.batches import REQUIRED_COLUMNS, collate

    stage = train_stage(compose(args))
    shards = sorted(Path(stage.paths.labels_dir).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(s, columns=REQUIRED_COLUMNS) for s in shards])
    size = GLOBAL_BATCH  # the same global batch as the Ray Train runs
    out = []
    for i in range(n):
        rows = table.slice((i * size) % max(1, table.num_rows - size), size).to_pydict()
        out.append(collate(rows, k=20, max_seq_len=stage.train.max_seq_len, pad_id=0))
    return stage, out


def _plain_loop(args, threads: int = CPUS):
    """The single-process set-up both plain parts share: the stage, its pre-collated batches and a function that
    runs one timed optimizer step (same model, loss and optimizer as the Ray Train runs; `threads` intra-op
    threads, all cores unless told)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.losses.kd import distillation_loss

    torch.set_num_threads(threads)
    stage, batches = _plain_batches(args, args.steps)
    model = AutoModelForCausalLM.from_pretrained(stage.student.name_or_path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b, alpha: float) -> float:
        start = time.perf_counter()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        loss = distillation_loss(logits, b["labels"], b["loss_mask"], b["teacher_ids"], b["teacher_logprobs"],
                                 b["teacher_tail"], alpha=alpha, temperature=stage.loss.temperature,
                                 divergence=stage.loss.divergence)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    return stage, batches, step


def part_plain(args, alpha: float | None = None, threads: int = CPUS) -> dict:
    """A single-process torch loop: same model, batch, loss and optimizer, `threads` intra-op threads."""
    stage, batches, step = _plain_loop(args, threads)
    alpha = stage.loss.alpha if alpha is None else alpha
    tokens, seconds = 0, 0.0
    for i, b in enumerate(batches):
        took = step(b, alpha)
        if i >= 5:
            seconds += took
            tokens += int(b["loss_mask"].sum())
    return {"tok_s": tokens / seconds, "step_s": seconds / (len(batches) - 5),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def part_paired(args) -> dict:
    """P5's timing: KD steps and CE-only steps interleaved in one process on the same model and batches (which
    goes first alternates), so drift on a shared machine falls on both; the median step of each."""
    import statistics

    stage, batches, step = _plain_loop(args)
    times: dict[float, list[float]] = {stage.loss.alpha: [], 1.0: []}
    for i, b in enumerate(batches):
        for alpha in (list(times) if i % 2 else list(times)[::-1]):
            took = step(b, alpha)
            if i >= 5:
                times[alpha].append(took)
    kd, ce = (statistics.median(times[a]) for a in (stage.loss.alpha, 1.0))
    return {"kd_step_s": kd, "ce_step_s": ce, "alpha": stage.loss.alpha}


PARTS = {"labels": part_labels, "paired": part_paired, "ray_train": lambda a: part_ray_train(a, "one_worker"),
         "ray_train_dp": lambda a: part_ray_train(a, "two_workers"), "plain": part_plain,
         "plain_ce": lambda a: part_plain(a, alpha=1.0), "ray_train_one_core": lambda a: part_ray_train(a, "one_core"),
         "plain_one_core": lambda a: part_plain(a, threads=1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("RAY_DISTILL_ROOT", "/tmp/ray-distill")) / "bench-train")
    ap.add_argument("--part", choices=list(PARTS))
    args = ap.parse_args()
    if args.part:
        parts.write_part(args.root, args.part, PARTS[args.part](args))
        return
    args.root.mkdir(parents=True, exist_ok=True)
    if not (args.root / "labels" / "manifest.json").exists():
        parts.run_part(__file__, "labels", args.root)
    ray_train = parts.run_part(__file__, "ray_train", args.root)
    plain = parts.run_part(__file__, "plain", args.root)
    ray_train_dp = parts.run_part(__file__, "ray_train_dp", args.root)
    one_core = {side: parts.run_part(__file__, f"{side}_one_core", args.root)["tok_s"]
                for side in ("ray_train", "plain")}
    ce = parts.run_part(__file__, "plain_ce", args.root)
    paired = parts.run_part(__file__, "paired", args.root)
    detail = {"student": STUDENT, "global_batch": GLOBAL_BATCH, "steps": args.steps, "deepspeed": "zero2",
              "dtype": "float32", "k": 20, "cpus": CPUS}
    print(json.dumps({"metric": "P4", "name": "train tokens/s, Ray Train + DeepSpeed vs plain torch loop",
                      "value": round(ray_train["tok_s"] / plain["tok_s"], 3), "goal": ">= 0.90", "unit": "ratio",
                      "detail": {"ray_deepspeed_tok_s": round(ray_train["tok_s"], 1),
                                 "plain_tok_s": round(plain["tok_s"], 1),
                                 "workers": SETUPS["one_worker"][0], "cpus_per_worker": SETUPS["one_worker"][1],
                                 "two_workers": {"tok_s": round(ray_train_dp["tok_s"], 1),
                                                 "ratio": round(ray_train_dp["tok_s"] / plain["tok_s"], 3),
                                                 "cpus_per_worker": SETUPS["two_workers"][1]},
                                 "one_core": {"ray_deepspeed_tok_s": round(one_core["ray_train"], 1),
                                              "plain_tok_s": round(one_core["plain"], 1),
                                              "ratio": round(one_core["ray_train"] / one_core["plain"], 3)},
                                 **detail}}))
    print(json.dumps({"metric": "P5", "name": "KD step (top-k sparse KL) vs CE-only step",
                      "value": round(paired["kd_step_s"] / paired["ce_step_s"], 3), "goal": "<= 1.10", "unit": "ratio",
                      "detail": {"kd_step_s": round(paired["kd_step_s"], 4), "ce_step_s": round(paired["ce_step_s"], 4),
                                 "timing": "median step, KD and CE steps interleaved in one process",
                                 "separate_processes": {"kd_step_s": round(plain["step_s"], 4),
                                                        "ce_step_s": round(ce["step_s"], 4),
                                                        "ratio": round(plain["step_s"] / ce["step_s"], 3)},
                                 "kd_peak_rss_mb": round(plain["peak_rss_mb"]), "ce_peak_rss_mb": round(ce["peak_rss_mb"]),
                                 **detail}}))


if __name__ == "__main__":
    main()
