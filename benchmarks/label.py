"""Label-stage benchmark: P1 (vs raw vLLM), P2 and P2u (vs a naive transformers loop), P3 (bytes and KL per token).

    python benchmarks/label.py [--rows 256] [--naive-rows 128] [--repeats 3] [--uniform-tokens 64] [--root DIR]

One teacher, two workloads. The teacher is a random-init Qwen2 with Qwen's 151,936-token vocabulary (~54M
parameters, fp32), decoding greedily so that every path does the same work.
- varied (P1, P2): responses end at the teacher's own end of turn, at lengths spread over the whole range up to
  256 tokens, as real labeling's do. A random model never ends a response by itself, so the teacher's
  end-of-turn row (embedding and LM head, tied) is turned towards a fixed random direction (`--eos-scale` times
  its norm): greedy decoding then meets it after a few to a few hundred tokens, depending on the prompt.
- uniform (P2u): the teacher as built, which never ends a response: every row runs to `--uniform-tokens`.

Every rate is a steady rate, start-up and warm-up outside it: the tokens after a path's first batch of `--batch`
rows over the time from that batch's output to the last one. The stage reports it from its own engine timers
(`pipeline.label.stage.steady_rate`). Raw vLLM is the stage's engine (same class, same settings), timed two ways:
given the same batches back to back (the same steady rate: what Ray around the engine costs), and given every
prompt in one warm `generate` call, which vLLM schedules continuously so that no batch waits for its longest row
(the engine's best on these prompts; P1 is against this one). The naive loop is batched
`generate(output_logits=True)` + top-k, each batch running to its longest row (static batching), over the first
`--naive-rows` rows (its rate is per batch, and it is the slowest path). Every path gets `--cpus` threads (default:
all cores; the stage's teacher actor reserves that many CPUs, for which Ray sets its OpenMP threads). Each workload
runs `--repeats` rounds of (stage, raw, loop), one process each; a figure is the median of the rounds' ratios,
reported with their spread. The stage cannot outrun its own engine: a stage above 1.05 times either raw rate makes
every figure of that workload a measurement error, reported as one. JSON lines go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import parts  # noqa: E402

TEACHER = dict(tokenizer_vocab_size=512, vocab_size=151_936, hidden_size=320, num_layers=4, num_heads=5,
               num_kv_heads=1, intermediate_size=1024, seed=0)
VARIED_TOKENS = 256  # the varied workload's response limit (few rows reach it)
IMPOSSIBLE = 1.05  # P1 above this: the stage "faster" than its own engine, i.e. a measurement error


def workload_root(args) -> Path:
    return args.root / args.workload


def overrides(args) -> list[str]:
    varied = args.workload == "varied"
    teacher = ([f"teacher.name_or_path={args.root / 'varied-teacher'}", "teacher.build=null"] if varied else
               [f"teacher.build.{k}={v}" for k, v in TEACHER.items()])
    tokens = VARIED_TOKENS if varied else args.uniform_tokens
    # the teacher actor gets the machine's cores (Ray gives it that many OpenMP threads), as the other paths do;
    # one more logical CPU leaves room for Ray Data's prepare and write tasks beside it
    return ["debug=tiny", f"paths.run_root={workload_root(args)}", f"data.build.num_rows={args.rows}",
            f"label.max_response_tokens={tokens}", "label.sampling.temperature=0",
            f"label.batch_size={args.batch}", "label.prepare_batch_size=128",
            f"label.num_cpus_per_actor={args.cpus}", f"cluster.num_cpus={args.cpus + 1}", *teacher, *args.set]


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


def steady(ends: list[float], tokens: list[int]) -> dict:
    """Tokens after the first batch over the time from its output to the last batch's."""
    span = ends[-1] - ends[0]
    return {"tok_s": sum(tokens[1:]) / span, "seconds": span, "tokens": sum(tokens), "batches": len(ends)}


def part_setup(args) -> dict:
    """The corpus of both workloads, the teacher, and the varied workload's teacher derived from it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import label_stage
    from pipeline.label.stage import build_manifest, ensure_corpus

    args.workload = "uniform"
    stage = label_stage(compose(args))
    ensure_corpus(stage)
    build_manifest(stage)  # builds the teacher
    info = json.loads((Path(stage.teacher.name_or_path) / "ray_distill_build.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(stage.teacher.name_or_path, dtype=torch.float32)
    eos = model.config.eos_token_id
    head = model.get_output_embeddings().weight  # tied: the end-of-turn token's embedding row as well
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head[eos] = direction / direction.norm() * head[eos].norm() * args.eos_scale
    out = args.root / "varied-teacher"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(stage.teacher.name_or_path).save_pretrained(out)
    args.workload = "varied"
    ensure_corpus(label_stage(compose(args)))
    return {"teacher_parameters": info["num_parameters"]}


def part_stage(args) -> dict:
    from pipeline.label.stage import run

    for folder in ("labels", "rejected"):  # every round labels the whole corpus
        shutil.rmtree(workload_root(args) / folder, ignore_errors=True)
    return run(compose(args))


def part_raw_vllm(args) -> dict:
    """The stage's own engine (its actor class's `vllm.LLM`, same settings), first given the same batches back to
    back (what the stage would reach with nothing around the engine), then every prompt in one call, which vLLM
    schedules continuously (no batch waits for its longest row: the engine's best on these prompts)."""
    os.environ["OMP_NUM_THREADS"] = str(args.cpus)  # what Ray gives the stage's actor of --cpus CPUs (before torch loads)
    from vllm.inputs import TokensPrompt

    from pipeline.generation.engine import VLLMGenerator, _row_seed, sampling_params

    stage, spec, ids = prompts(args)
    llm = VLLMGenerator(spec).llm
    source = stage.data.paths[0]
    params = [sampling_params(spec, len(p), _row_seed(spec, {"source": source, "line": i})) for i, p in enumerate(ids)]
    reqs = [TokensPrompt(prompt_token_ids=p) for p in ids]
    ends, tokens, lengths = [], [], []
    for b in range(0, len(reqs), args.batch):
        outs = llm.generate(reqs[b:b + args.batch], params[b:b + args.batch], use_tqdm=False)
        ends.append(time.perf_counter())
        lengths += [len(o.outputs[0].token_ids) for o in outs]
        tokens.append(sum(lengths[b:]))
    start = time.perf_counter()  # the engine is warm by now
    outs = llm.generate(reqs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    at_once = sum(len(o.outputs[0].token_ids) for o in outs)
    return {**steady(ends, tokens), "lengths": _spread(lengths), "all_tok_s": at_once / seconds,
            "all_seconds": seconds}


def part_naive_hf(args) -> dict:
    """Batched `generate(output_logits=True)` + top-k from the logits: the fair do-it-yourself labeler. Each batch
    runs until its longest row ends; only the tokens up to each row's own end count."""
    import torch
    from transformers import AutoModelForCausalLM

    stage, spec, ids = prompts(args)
    ids = ids[:args.naive_rows]  # its rate is per batch, each batch alike: a few batches measure it
    torch.set_num_threads(args.cpus)
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=getattr(torch, spec.dtype)).eval()
    pad = model.config.pad_token_id or 0
    eos = model.generation_config.eos_token_id
    ends, tokens, lengths, slots = [], [], [], 0
    for b in range(0, len(ids), args.batch):
        batch = ids[b:b + args.batch]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=spec.max_response_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=pad)
            for logits in out.logits:  # [B, V] per step
                torch.log_softmax(logits.float(), -1).topk(spec.k, dim=-1)
        ends.append(time.perf_counter())
        generated = out.sequences[:, width:].tolist()
        batch_lengths = [row.index(eos) + 1 if eos in row else len(row) for row in generated]
        lengths += batch_lengths
        tokens.append(sum(batch_lengths))
        slots += len(generated) * len(generated[0])
    return {**steady(ends, tokens), "lengths": _spread(lengths), "useful_share": round(sum(lengths) / slots, 3)}


def part_ray_data_llm(args) -> dict:
    """The alternative engine path: ray.data.llm's build_processor fed the same token ids, same logprobs,
    turning its per-token logprob dicts into the same arrays the stage stores; steady rate from its outputs."""
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
    rows = sorted(processor(ray.data.from_items([{"ids": p} for p in ids])).take_all(), key=lambda r: r["done_at"])
    first = args.batch - 1  # from the first batch's output on, as for the other paths
    span = rows[-1]["done_at"] - rows[first]["done_at"]
    return {"tok_s": sum(r["tokens"] for r in rows[first + 1:]) / span, "seconds": span}


def part_kl(args) -> dict:
    """Codec error of P3 on fp32 reference distributions of the labeled sequences."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import label_stage
    from pipeline.data.schema import stored_kl_error

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


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "max": values[-1],
            "mean": round(sum(values) / len(values), 1)}


PARTS = {"setup": part_setup, "stage": part_stage, "raw_vllm": part_raw_vllm, "naive_hf": part_naive_hf,
         "ray_data_llm": part_ray_data_llm, "kl": part_kl}


def rounds(args, workload: str, count: int, *flags: str, naive: bool = True) -> list[dict]:
    """`count` rounds of (stage, raw vLLM, naive loop) on one workload, each in its own process."""
    out = []
    flags = (f"--workload={workload}", *flags)
    for i in range(count):
        stage = parts.run_part(__file__, "stage", args.root / workload, *flags)["this_run"]
        if stage["steady_tokens_per_s"] is None:
            raise SystemExit(f"the {workload} stage run gave no steady rate (one engine call only): raise --rows")
        raw = parts.run_part(__file__, "raw_vllm", args.root / workload, *flags)
        out.append({"stage": stage, "raw": raw, "raw_all": {"tok_s": raw["all_tok_s"]}})
        if naive:
            out[-1]["naive"] = parts.run_part(__file__, "naive_hf", args.root / workload, *flags)
        print(f"{workload} {' '.join(flags[1:])} round {i + 1}: " +
              ", ".join(f"{k} {v.get('steady_tokens_per_s') or v.get('tok_s'):.1f}" for k, v in out[-1].items()) +
              " tok/s", file=sys.stderr, flush=True)
    return out


def ratio(runs: list[dict], num: str, den: str) -> dict:
    def rate(run, path):
        return run[path]["steady_tokens_per_s"] if path == "stage" else run[path]["tok_s"]

    values = [rate(r, num) / rate(r, den) for r in runs]
    return {"median": round(statistics.median(values), 3), "runs": [round(v, 3) for v in values]}


def metric(name: str, title: str, value: dict, goal: str, detail: dict, p1: dict) -> dict:
    """One JSON line; when the stage outran its own engine in the same rounds (`p1`: the stage ÷ the engine, the
    higher of the two ways it is timed), the figure is a measurement error."""
    line = {"metric": name, "name": title, "value": value["median"], "goal": goal, "unit": "ratio",
            "detail": {"rounds": value["runs"], **detail}}
    if p1["median"] > IMPOSSIBLE:
        line["value"] = None
        line["error"] = (f"measurement error: the stage measured {p1['median']}x its own engine's rate in the same "
                         f"rounds (at most {IMPOSSIBLE} is possible); re-run with more --rows or on a quieter machine")
    return line


def summary(runs: list[dict]) -> dict:
    def median(path, key):
        return round(statistics.median(r[path][key] for r in runs), 1)

    last = runs[-1]
    return {"stage_tok_s": median("stage", "steady_tokens_per_s"), "raw_tok_s": median("raw_all", "tok_s"),
            "raw_same_batches_tok_s": median("raw", "tok_s"),
            "naive_tok_s": median("naive", "tok_s"), "stage_steady_seconds": median("stage", "steady_seconds"),
            "stage_wall_seconds": median("stage", "seconds"), "engine_busy": median("stage", "engine_busy"),
            "tokens": last["stage"]["tokens"], "lengths": last["raw"]["lengths"],
            "naive_useful_share": last["naive"]["useful_share"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--uniform-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--naive-rows", type=int, default=128, help="rows the naive loop labels (its slowest part)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPU threads of every path (the stage's actor)")
    ap.add_argument("--eos-scale", type=float, default=1.75,
                    help="the varied teacher's end-of-turn row, in norms of the original (2: shorter responses)")
    ap.add_argument("--ray-data-llm", action="store_true", help="also time ray.data.llm's processor (varied workload)")
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("RAY_DISTILL_ROOT", "/tmp/ray-distill")) / "bench-label")
    ap.add_argument("--workload", choices=["varied", "uniform"], default="varied")
    ap.add_argument("--part", choices=list(PARTS))
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override, e.g. teacher.dtype=bfloat16")
    args = ap.parse_args()
    if args.part:
        parts.write_part(workload_root(args) if args.part != "setup" else args.root, args.part, PARTS[args.part](args))
        return
    if min(args.rows, args.naive_rows) < 2 * args.batch:
        raise SystemExit(f"--rows and --naive-rows must be at least two batches ({2 * args.batch} rows): a steady rate "
                         "starts after the first batch")
    args.root.mkdir(parents=True, exist_ok=True)
    setup = parts.run_part(__file__, "setup", args.root)
    varied = rounds(args, "varied", args.repeats)
    uniform = rounds(args, "uniform", args.repeats)
    # the stage's actor and the raw engine on one thread each: on a small box the stage's Ray processes share the
    # cores with the engine's threads; with a core left to them this shows what the stage itself costs
    one_core = rounds(args, "varied", 1, "--cpus=1", naive=False) if args.cpus > 1 else None
    kl = parts.run_part(__file__, "kl", args.root / "varied", "--workload=varied")
    rdl = (parts.run_part(__file__, "ray_data_llm", args.root / "varied", "--workload=varied")
           if args.ray_data_llm else None)
    model = {"model": "random-init Qwen2, vocab 151936", "parameters": setup["teacher_parameters"],
             "rows": args.rows, "naive_rows": args.naive_rows, "batch": args.batch, "k": 20,
             "repeats": args.repeats, "cpu_threads": args.cpus}
    p1, p1_batches = ratio(varied, "stage", "raw_all"), ratio(varied, "stage", "raw")
    bound = max((p1, p1_batches), key=lambda r: r["median"])  # the stage cannot outrun its engine either way
    bound_u = max((ratio(uniform, "stage", "raw_all"), ratio(uniform, "stage", "raw")), key=lambda r: r["median"])
    last = varied[-1]["stage"]
    lines = [
        metric("P1", "label tokens/s vs raw vLLM generate over the same prompts (responses of varied length)", p1,
               ">= 0.90", {**summary(varied), "vs_same_batches": p1_batches,
                           "ray_data_llm_tok_s": round(rdl["tok_s"], 1) if rdl else None,
                           "uniform": {"P1": ratio(uniform, "stage", "raw_all"),
                                       "vs_same_batches": ratio(uniform, "stage", "raw")},
                           "one_core": one_core and {
                               "P1": ratio(one_core, "stage", "raw_all"),
                               "vs_same_batches": ratio(one_core, "stage", "raw"),
                               "stage_tok_s": one_core[0]["stage"]["steady_tokens_per_s"],
                               "raw_tok_s": round(one_core[0]["raw_all"]["tok_s"], 1),
                               "raw_same_batches_tok_s": round(one_core[0]["raw"]["tok_s"], 1)}, **model}, bound),
        metric("P2", "label tokens/s vs naive transformers generate+output_logits (varied lengths, own EOS)",
               ratio(varied, "stage", "naive"), ">= 3.0",
               {**summary(varied), "raw_vllm_vs_naive": ratio(varied, "raw_all", "naive"), **model}, bound),
        metric("P2u", "label tokens/s vs naive transformers generate+output_logits (uniform length)",
               ratio(uniform, "stage", "naive"), "report",
               {**summary(uniform), "response_tokens": args.uniform_tokens,
                "raw_vllm_vs_naive": ratio(uniform, "raw_all", "naive"), **model}, bound_u),
        {"metric": "P3", "name": "bytes on disk per scored token at k=20", "value": last["bytes"] and round(
            last["bytes"] / last["tokens"], 2), "goal": "<= 64, KL error <= 1e-3", "unit": "bytes/token",
         "detail": {"kl_error_nats": kl["kl_error_nats"], "tokens_scored": last["tokens"],
                    "plain_int32_fp32_bytes": 160, "workload": "varied", **model}},
    ]
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
