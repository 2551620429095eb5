"""Label-stage benchmark: P1 (vs raw vLLM), P2 (vs a naive transformers loop), P3 (bytes and KL per token).

    python benchmarks/label.py [--rows 256] [--response-tokens 32] [--root /tmp/bench-label]

All three are measured in one run on one machine with one teacher: a random-init Qwen2 with Qwen's
151,936-token vocabulary (~54M parameters, fp32), greedy decoding so every path does the same work.
Each measurement runs in its own process so engines never share memory. JSON lines go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import parts  # noqa: E402

TEACHER = dict(tokenizer_vocab_size=512, vocab_size=151_936, hidden_size=320, num_layers=4, num_heads=5,
               num_kv_heads=1, intermediate_size=1024, seed=0)


def overrides(args) -> list[str]:
    return ["debug=tiny", f"paths.run_root={args.root}", f"data.build.num_rows={args.rows}",
            f"label.max_response_tokens={args.response_tokens}", "label.sampling.temperature=0",
            f"label.batch_size={args.batch}", "label.prepare_batch_size=128",
            *[f"teacher.build.{k}={v}" for k, v in TEACHER.items()], *args.set]


def compose(args):
    return parts.compose(overrides(args))


def prompts(args):
    """The corpus' prompts as token ids, exactly as the label stage prepares them."""
    from pipeline.config import label_stage
    from pipeline.generation.prepare import tokenize_row
    from pipeline.generation.reader import parse_row
    from pipeline.label.stage import prepare_spec, teacher_spec

    stage = label_stage(compose(args))
    spec = prepare_spec(stage)
    out = []
    for line in Path(stage.data.paths[0]).read_bytes().splitlines():
        row, _ = parse_row(line, "generate")
        out.append(tokenize_row(row, spec)[0])
    return stage, teacher_spec(stage), out


def part_setup(args) -> dict:
    from pipeline.config import label_stage
    from pipeline.label.stage import build_manifest, ensure_corpus

    stage = label_stage(compose(args))
    ensure_corpus(stage)
    build_manifest(stage)  # builds the teacher
    info = json.loads((Path(stage.teacher.name_or_path) / "ray_distill_build.json").read_text())
    return {"teacher_parameters": info["num_parameters"]}


def part_stage(args) -> dict:
    from pipeline.label.stage import run

    summary = run(compose(args))
    return summary


def part_raw_vllm(args) -> dict:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from pipeline.generation.engine import _row_seed, engine_kwargs, sampling_params

    stage, spec, ids = prompts(args)
    llm = LLM(**engine_kwargs(spec))
    source = stage.data.paths[0]
    params = [sampling_params(spec, len(p), _row_seed(spec, {"source": source, "line": i})) for i, p in enumerate(ids)]
    reqs = [TokensPrompt(prompt_token_ids=p) for p in ids]
    llm.generate(reqs[:4], params[:4], use_tqdm=False)  # warm-up, as the stage's first batch is
    start = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def part_ray_data_llm(args) -> dict:
    """The alternative engine path: ray.data.llm's build_processor fed the same token ids, same logprobs,
    turning its per-token logprob dicts into the same arrays the stage stores. Steady-state rate, like P1."""
    import numpy as np
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from pipeline.generation.engine import engine_kwargs

    stage, spec, ids = prompts(args)
    ray.init(include_dashboard=False)
    kwargs = engine_kwargs(spec)
    model = kwargs.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=kwargs, batch_size=args.batch, concurrency=1,
        placement_group_config={"bundles": [{"CPU": 1}]}, chat_template_stage=False, tokenize_stage=False,
        detokenize_stage=False)

    def pre(row):
        return {"tokenized_prompt": row["ids"], "sampling_params": {
            "max_tokens": spec.max_response_tokens, "temperature": 0.0, "logprobs": spec.k, "detokenize": False}}

    def post(row):
        lps = row["logprobs"]  # one {token_id: {logprob, rank, ...}} dict per generated token
        top = np.array([[v["logprob"] for v in sorted(d.values(), key=lambda v: v["rank"] or 0)][:spec.k]
                        for d in lps], dtype=np.float32)
        return {"tokens": len(row["generated_tokens"]), "done_at": time.time(), "n": top.size}

    processor = build_processor(config, preprocess=pre, postprocess=post)
    wall = time.perf_counter()
    rows = processor(ray.data.from_items([{"ids": p} for p in ids])).take_all()
    wall = time.perf_counter() - wall
    times = sorted(r["done_at"] for r in rows)
    first_batch = args.batch  # leave out the first batch, as the stage's steady rate does
    span = times[-1] - times[first_batch - 1]
    tokens = sum(r["tokens"] for r in rows) * (len(rows) - first_batch) / len(rows)
    return {"tokens": tokens, "seconds": span, "tok_s": tokens / span, "wall_s": wall,
            "tokens_total": sum(r["tokens"] for r in rows)}


def part_naive_hf(args) -> dict:
    """Batched `generate(output_logits=True)` + top-k from the logits: the fair do-it-yourself labeler."""
    import torch
    from transformers import AutoModelForCausalLM

    stage, spec, ids = prompts(args)
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=getattr(torch, spec.dtype)).eval()
    pad = model.config.pad_token_id or 0
    tokens = 0
    start = None
    for b in range(0, len(ids), args.batch):
        batch = ids[b:b + args.batch]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        if start is None:  # warm-up on the first batch, mirroring the vLLM paths
            with torch.no_grad():
                model.generate(input_ids=input_ids[:4], attention_mask=mask[:4], max_new_tokens=2, do_sample=False)
            start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=spec.max_response_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=pad)
            for logits in out.logits:  # [B, V] per step
                torch.log_softmax(logits.float(), -1).topk(spec.k, dim=-1)
        tokens += (out.sequences.shape[1] - width) * len(batch)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def part_kl(args) -> dict:
    """Codec error of P3 on fp32 reference distributions of the labeled sequences."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import label_stage
    from pipeline.data.schema import stored_kl_error
    import pyarrow.parquet as pq

    stage = label_stage(compose(args))
    model = AutoModelForCausalLM.from_pretrained(stage.teacher.name_or_path, dtype=torch.float32).eval()
    shard = sorted(Path(stage.paths.labels_dir).glob("part-*.parquet"))[0]
    errs = []
    for row in pq.read_table(shard).to_pylist()[:16]:
        p, r = row["prompt_ids"], row["response_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)[len(p) - 1:len(p) + len(r) - 1]
        top = lp.topk(stage.label.k, dim=-1)
        errs.append(stored_kl_error(top.indices.numpy(), top.values.numpy()))
    return {"kl_error_nats": float(np.mean(errs))}


PARTS = {"setup": part_setup, "stage": part_stage, "raw_vllm": part_raw_vllm, "naive_hf": part_naive_hf,
         "ray_data_llm": part_ray_data_llm, "kl": part_kl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--response-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("RAY_DISTILL_ROOT", "/tmp/ray-distill")) / "bench-label")
    ap.add_argument("--part", choices=list(PARTS))
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override, e.g. teacher.dtype=bfloat16")
    args = ap.parse_args()
    if args.part:
        parts.write_part(args.root, args.part, PARTS[args.part](args))
        return
    import shutil

    args.root.mkdir(parents=True, exist_ok=True)
    for root in (args.root, args.root / "double"):
        shutil.rmtree(root / "labels", ignore_errors=True)
        shutil.rmtree(root / "rejected", ignore_errors=True)
    double = [f"--rows={2 * args.rows}", f"--root={args.root / 'double'}"]
    setup = parts.run_part(__file__, "setup", args.root)
    parts.run_part(__file__, "setup", args.root / "double", *double)
    stage = parts.run_part(__file__, "stage", args.root)
    stage2 = parts.run_part(__file__, "stage", args.root / "double", *double)
    raw = parts.run_part(__file__, "raw_vllm", args.root)
    naive = parts.run_part(__file__, "naive_hf", args.root)
    rdl = parts.run_part(__file__, "ray_data_llm", args.root)
    rdl2 = parts.run_part(__file__, "ray_data_llm", args.root / "double", *double)
    kl = parts.run_part(__file__, "kl", args.root)
    run, run2 = stage["this_run"], stage2["this_run"]
    # Marginal rate: the extra tokens of the 2N-row run over its extra seconds; start-up cancels out.
    label_tok_s = (run2["tokens"] - run["tokens"]) / (run2["seconds"] - run["seconds"])
    rdl_tok_s = (rdl2["tokens_total"] - rdl["tokens_total"]) / (rdl2["wall_s"] - rdl["wall_s"])
    model = {"model": "random-init Qwen2, vocab 151936", "parameters": setup["teacher_parameters"],
             "rows": args.rows, "response_tokens": args.response_tokens, "batch": args.batch, "k": 20}
    lines = [
        {"metric": "P1", "name": "label tokens/s vs raw vLLM", "value": round(label_tok_s / raw["tok_s"], 3),
         "goal": ">= 0.90", "unit": "ratio",
         "detail": {"label_tok_s_marginal": round(label_tok_s, 1), "label_tok_s_after_first_write":
                    run2["steady_tokens_per_s"], "label_seconds": [run["seconds"], run2["seconds"]],
                    "raw_tok_s": round(raw["tok_s"], 1), "raw_seconds": round(raw["seconds"], 2),
                    "ray_data_llm_tok_s_marginal": round(rdl_tok_s, 1), **model}},
        {"metric": "P2", "name": "label tokens/s vs naive transformers generate+output_logits",
         "value": round(label_tok_s / naive["tok_s"], 3), "goal": ">= 1.8", "unit": "ratio",
         "detail": {"label_tok_s_marginal": round(label_tok_s, 1), "naive_tok_s": round(naive["tok_s"], 1),
                    "raw_vllm_vs_naive": round(raw["tok_s"] / naive["tok_s"], 3),
                    "naive_seconds": round(naive["seconds"], 2), **model}},
        {"metric": "P3", "name": "bytes on disk per scored token at k=20", "value": stage2["bytes_per_scored_token"],
         "goal": "<= 64, KL error <= 1e-3", "unit": "bytes/token",
         "detail": {"kl_error_nats": kl["kl_error_nats"], "tokens_scored": stage2["tokens_scored"],
                    "plain_int32_fp32_bytes": 160, **model}},
    ]
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
