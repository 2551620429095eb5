"""Online-distillation benchmark: step time and peak memory of each online mode ÷ the offline top-k KD step on the
same student and batch (P12), and GaLore's optimizer state ÷ AdamW's on the same student (P13).

    python benchmarks/online.py [--steps 20] [--repeats 3] [--root /tmp/bench-online]

A 4-layer, 256-wide student (the train benchmark's) and an 8-layer, 512-wide teacher on the tiny tokenizer, full
fine-tuning in float32, a batch of 8 sequences of 256 tokens (the last 128 scored, top-20 labels). Modes: offline
(the baseline: top-k KD on the labels), online_kd (+ full-vocabulary KD against the live teacher), hidden (+ block
outputs through learned projections), attention (+ attention maps of the mapped layers), all (every term, as
loss=kd_online). Each is the worker's own code (`OnlineTeacher.add_terms` over `configured_loss`) in a single
process: what a Ray Train worker adds around it (the process group's all-reduce, DeepSpeed) is the same for every
mode and is P4's subject.

Each (mode, repeat) runs in its own process, the modes taking turns within each repeat, so the machine's drift falls
on all of them; a ratio is taken within one repeat, and the median over repeats is reported with its range. Step
time: the median of `--steps` steps after a first. Memory: the process's peak resident memory (ru_maxrss: the
models, the teacher's weights online, the optimizer's state, a step's activations), and in `detail` what the steps
added above the process with its models loaded.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import parts  # noqa: E402

STUDENT = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768, seed=1)
TEACHER = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536, seed=0)
BATCH, SEQ, SCORED, K = 8, 256, 128, 20
MODES = {"offline": {}, "online_kd": {"online_kd": 1.0}, "hidden": {"hidden": 1.0}, "attention": {"attention": 1.0},
         "all": {"online_kd": 1.0, "hidden": 1.0, "attention": 1.0}}


def models(root: Path) -> dict[str, Path]:
    from pipeline.models.tiny import build_tiny_model

    out = {}
    for role, shape in (("student", STUDENT), ("teacher", TEACHER)):
        out[role] = root / f"{role}-{shape['hidden_size']}x{shape['num_layers']}"
        if not (out[role] / "config.json").exists():
            build_tiny_model(out[role], root / "tokenizer", vocab_size=512, **shape)
    return out


def batch():
    """A fixed batch: random token ids, the last SCORED positions scored against random top-K teacher labels."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ - 1)
    mask[:, SEQ - 1 - SCORED:] = 1
    top = torch.log_softmax(torch.randn(BATCH, SEQ - 1, K + 1, generator=g), -1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1:], "loss_mask": mask,
            "teacher_ids": torch.randint(3, 512, (BATCH, SEQ - 1, K), generator=g),
            "teacher_logprobs": top[..., :-1].contiguous(), "teacher_tail": top[..., -1].contiguous()}


def loss_config(mode: str) -> dict:
    return {"objective": "distill", "alpha": 0.3, "temperature": 2.0, "divergence": "forward_kl",
            "divergence_kwargs": {}, "hidden_loss": "cosine", "layer_map": None,
            "weights": {"offline": 1.0, "online_kd": 0.0, "hidden": 0.0, "attention": 0.0, **MODES[mode]}}


def part_mode(args, mode: str) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.losses.kd import configured_loss
    from pipeline.train.worker import OnlineTeacher, attention_of

    torch.manual_seed(0)
    paths = models(args.root)
    spec = SimpleNamespace(loss=loss_config(mode), use_gpu=False, precision="fp32", micro_batch_size=BATCH,
                           teacher=str(paths["teacher"]), teacher_revision=None, teacher_placement="device",
                           teacher_attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32,
                                                 attn_implementation=attention_of(spec, "sdpa"))
    online = OnlineTeacher(model, spec, rank=1) if mode != "offline" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b = batch()

    def step() -> float:
        start = time.perf_counter()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        losses = configured_loss(logits, b, spec.loss)
        if online is not None:
            losses = online.add_terms(losses, b, logits)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    loaded = psutil.Process().memory_info().rss
    first = step()
    times = [step() for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(times), "peak_mb": peak / 2**20, "loaded_mb": loaded / 2**20,
            "first_step_s": first}


def part_optimizer(args, name: str) -> dict:
    """One AdamW or GaLore step on the student (rank width/8 on the decoder's linear layers); the state's bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.train.worker import build_optimizer, optimizer_state_bytes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(models(args.root)["student"], dtype=torch.float32)
    rank = STUDENT["hidden_size"] // 8
    spec = SimpleNamespace(optimizer=name, lr=1e-4, weight_decay=0.0,
                           galore={"rank": rank, "update_proj_gap": 200, "scale": 0.25})
    opt = build_optimizer(model, spec)
    b = batch()
    model(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()
    start = time.perf_counter()
    opt.step()
    took = time.perf_counter() - start
    linear = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return {"state_bytes": optimizer_state_bytes(opt), "linear_state_bytes": optimizer_state_bytes(opt, linear),
            "rank": rank, "first_step_s": took, "parameters": sum(p.numel() for p in model.parameters())}


PARTS = {"models": lambda a: {k: str(v) for k, v in models(a.root).items()},
         **{f"mode_{m}": (lambda a, m=m: part_mode(a, m)) for m in MODES},
         **{f"optimizer_{o}": (lambda a, o=o: part_optimizer(a, o)) for o in ("adamw", "galore")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path("/tmp/bench-online"))
    ap.add_argument("--part")
    args = ap.parse_args()
    if args.part:
        parts.write_part(args.root, args.part, PARTS[args.part](args))
        return
    parts.run_part(__file__, "models", args.root)  # built once, in a process of its own (its imports print)
    runs = [{m: parts.run_part(__file__, f"mode_{m}", args.root) for m in MODES} for _ in range(args.repeats)]
    for mode in MODES:
        if mode == "offline":
            continue
        time_ratio = [r[mode]["step_s"] / r["offline"]["step_s"] for r in runs]
        memory_ratio = [r[mode]["peak_mb"] / r["offline"]["peak_mb"] for r in runs]
        added_ratio = [(r[mode]["peak_mb"] - r[mode]["loaded_mb"])
                       / (r["offline"]["peak_mb"] - r["offline"]["loaded_mb"]) for r in runs]
        print(json.dumps({
            "metric": f"P12_{mode}", "name": f"{mode} step vs the offline top-k KD step (time; memory in detail)",
            "value": round(statistics.median(time_ratio), 3), "goal": "report", "unit": "ratio",
            "detail": {"time_ratio_range": [round(min(time_ratio), 3), round(max(time_ratio), 3)],
                       "memory_ratio": round(statistics.median(memory_ratio), 3),
                       "memory_ratio_range": [round(min(memory_ratio), 3), round(max(memory_ratio), 3)],
                       "step_s": [round(r[mode]["step_s"], 4) for r in runs],
                       "offline_step_s": [round(r["offline"]["step_s"], 4) for r in runs],
                       # the process's peak, and what it held before the first step (the models: online, the teacher)
                       "peak_mb": [round(r[mode]["peak_mb"]) for r in runs],
                       "offline_peak_mb": [round(r["offline"]["peak_mb"]) for r in runs],
                       "loaded_mb": [round(r[mode]["loaded_mb"]) for r in runs],
                       "offline_loaded_mb": [round(r["offline"]["loaded_mb"]) for r in runs],
                       # what the steps added above that (activations, the optimizer's state, the allocator's cache)
                       "added_ratio": round(statistics.median(added_ratio), 3),
                       "student": STUDENT, "teacher": TEACHER, "batch": [BATCH, SEQ], "scored": SCORED, "k": K,
                       "steps": args.steps, "repeats": args.repeats}}), flush=True)
    got = {o: parts.run_part(__file__, f"optimizer_{o}", args.root) for o in ("adamw", "galore")}
    adamw, galore = got["adamw"], got["galore"]
    print(json.dumps({
        "metric": "P13", "name": "GaLore optimizer state vs AdamW's on the decoder's linear layers",
        "value": round(galore["linear_state_bytes"] / adamw["linear_state_bytes"], 3), "goal": "<= 0.40",
        "unit": "ratio",
        "detail": {"rank": galore["rank"], "width": STUDENT["hidden_size"],
                   "whole_student_ratio": round(galore["state_bytes"] / adamw["state_bytes"], 3),
                   "adamw_mb": round(adamw["state_bytes"] / 2**20, 2),
                   "galore_mb": round(galore["state_bytes"] / 2**20, 2),
                   "adamw_linear_mb": round(adamw["linear_state_bytes"] / 2**20, 2),
                   "galore_linear_mb": round(galore["linear_state_bytes"] / 2**20, 2),
                   "parameters": adamw["parameters"],
                   "measured": "bytes of every tensor in the optimizer's state after one step (GaLore's projection "
                               "matrices included)"}}), flush=True)


if __name__ == "__main__":
    main()
