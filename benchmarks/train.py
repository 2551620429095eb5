"""Train-stage benchmark: P4 (Ray Train + DeepSpeed vs a plain torch loop), P5 (KD step vs CE step) and P10 (the KD
step's peak memory vs the CE step's at Qwen's vocabulary).

    python benchmarks/train.py [--rows 256] [--steps 40] [--root /tmp/bench-train]
    python benchmarks/train.py --p10 [--chunk 1024]      # P10 only (about a minute, up to ~10 GB of memory)

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

P10 trains a narrow Qwen2 (64 wide, 2 layers, untied LM head) at V = 151,936 on one 2048-token sequence (1536
scored), k = 20, float32, each kind of step in its own process: the CE-only step on the model's full logits (the
baseline), the KD step with the LM head fused into the loss (`train.loss_chunk_tokens`, what the stage runs), and
beside them the KD step on the full logits (the loss before the fused one) and the fused CE step. The figure is
the peak resident memory a step adds to the process (model, optimizer state and batch already in place).
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

    from dataclasses import asdict

    from pipeline.losses.kd import configured_loss

    torch.set_num_threads(threads)
    stage, batches = _plain_batches(args, args.steps)
    model = AutoModelForCausalLM.from_pretrained(stage.student.name_or_path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    chunk = stage.train.loss_chunk_tokens  # the stage's loss: the LM head fused in unless it is 0

    def step(b, alpha: float) -> float:
        start = time.perf_counter()
        inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss_cfg = dict(asdict(stage.loss), alpha=alpha)
        if chunk:
            hidden = model.model(**inputs).last_hidden_state[:, :-1]
            loss = configured_loss(hidden, b, loss_cfg, model.lm_head, chunk)["loss"]
        else:
            loss = configured_loss(model(**inputs).logits[:, :-1], b, loss_cfg)["loss"]
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


# P10: a narrow student at Qwen's vocabulary, one sequence of 2048 tokens (512 prompt, 1536 scored response)
P10_VOCAB, P10_SEQ, P10_PROMPT, P10_K = 151_936, 2048, 512, 20
P10_STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, tie_word_embeddings=False)


def part_memory(args, kind: str) -> dict:
    """One process per kind: the step's peak resident memory above what the process held before it (the model,
    its optimizer state after a first step, the batch), and the median step time of the steps after the first.
    `ce`: the CE-only step on the model's full logits; `kd_full`: the KD step on the full logits (the loss before
    the fused one); `kd_fused`, `ce_fused`: the LM head fused into the loss, `args.chunk` positions at a time."""
    import statistics

    import psutil
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.losses.kd import distillation_loss, fused_distillation_loss

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=P10_VOCAB, max_position_embeddings=P10_SEQ, **P10_STUDENT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, P10_VOCAB, (1, P10_SEQ), generator=g)
    mask = torch.zeros(1, P10_SEQ - 1)
    mask[:, P10_PROMPT - 1:] = 1
    t_ids = torch.randint(0, P10_VOCAB, (1, P10_SEQ - 1, P10_K), generator=g)
    t_lps = torch.log_softmax(torch.randn(1, P10_SEQ - 1, P10_K + 1, generator=g), -1)
    teacher = (t_ids, t_lps[..., :-1].contiguous(), t_lps[..., -1].contiguous())
    alpha = 1.0 if kind.startswith("ce") else 0.3
    fused = kind.endswith("fused")

    def step() -> float:
        start = time.perf_counter()
        if fused:
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            out = fused_distillation_loss(hidden, model.lm_head, ids[:, 1:], mask, *teacher, alpha=alpha,
                                          temperature=2.0, chunk_tokens=args.chunk)
        else:
            logits = model(input_ids=ids).logits[:, :-1]
            out = distillation_loss(logits, ids[:, 1:], mask, *teacher, alpha=alpha, temperature=2.0)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step()  # allocates the optimizer's state: part of what the process holds, not of a step
    before = psutil.Process().memory_info().rss
    times = [step() for _ in range(3)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_peak_mb": (peak - before) / 2**20, "process_peak_mb": peak / 2**20, "before_mb": before / 2**20,
            "step_s": statistics.median(times), "first_step_s": first}


PARTS = {"labels": part_labels, "paired": part_paired, "ray_train": lambda a: part_ray_train(a, "one_worker"),
         "ray_train_dp": lambda a: part_ray_train(a, "two_workers"), "plain": part_plain,
         "plain_ce": lambda a: part_plain(a, alpha=1.0), "ray_train_one_core": lambda a: part_ray_train(a, "one_core"),
         "plain_one_core": lambda a: part_plain(a, threads=1),
         **{f"memory_{kind}": (lambda a, kind=kind: part_memory(a, kind))
            for kind in ("ce", "kd_full", "kd_fused", "ce_fused")}}


def p10(args) -> None:
    """P10, each kind in its own process; the ratio of the KD step's peak to the CE-only step's (both above the
    model, its optimizer state and the batch). `--p10` runs only this."""
    got = {kind: parts.run_part(__file__, f"memory_{kind}", args.root) for kind in ("ce", "kd_full", "kd_fused",
                                                                                     "ce_fused")}
    ce = got["ce"]["step_peak_mb"]
    print(json.dumps({"metric": "P10", "name": "peak memory of the KD training step vs the CE-only step",
                      "value": round(got["kd_fused"]["step_peak_mb"] / ce, 3), "goal": "<= 1.10", "unit": "ratio",
                      "detail": {"vocab": P10_VOCAB, "sequence": P10_SEQ, "scored": P10_SEQ - P10_PROMPT, "k": P10_K,
                                 "student": P10_STUDENT, "chunk_tokens": args.chunk, "dtype": "float32",
                                 "kd_full_ratio": round(got["kd_full"]["step_peak_mb"] / ce, 3),
                                 **{f"{kind}_step_peak_mb": round(r["step_peak_mb"]) for kind, r in got.items()},
                                 **{f"{kind}_step_s": round(r["step_s"], 3) for kind, r in got.items()},
                                 "measured": "resident memory (ru_maxrss) above the process before the step; "
                                             "median of 3 steps after a first that allocates the optimizer"}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("RAY_DISTILL_ROOT", "/tmp/ray-distill")) / "bench-train")
    ap.add_argument("--part", choices=list(PARTS))
    ap.add_argument("--chunk", type=int, default=1024, help="P10: positions per chunk of the fused loss")
    ap.add_argument("--p10", action="store_true", help="measure P10 only")
    args = ap.parse_args()
    if args.part:
        parts.write_part(args.root, args.part, PARTS[args.part](args))
        return
    args.root.mkdir(parents=True, exist_ok=True)
    if args.p10:
        p10(args)
        return
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
    p10(args)


if __name__ == "__main__":
    main()
