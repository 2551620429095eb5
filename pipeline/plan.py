"""What a run will ask of the cluster, whether that fits, and what it will cost — before anything starts.

Each stage of the chain (as `pipeline.chain` derives its config) becomes a few asks: so many actors, workers,
tasks or replicas, each needing CPUs and GPUs on one node, and for models on GPUs the memory of their weights.
The asks are checked against the cluster described in config (`cluster.node_types`, the same node types the
manifests in cluster/ create, or this machine for an embedded Ray): a minimum that cannot be placed refuses the
run with one sentence naming the stage and the shortfall. The estimates (tokens, hours, GPU-hours, storage, cost)
are arithmetic on the corpus size and the throughput assumptions in `conf/plan/`, whose sources are written there.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

# bytes per parameter of a model in each dtype (auto: the bf16 of a GPU checkpoint)
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclass
class NodeType:
    name: str
    cpus: float
    gpus: float
    gpu_type: str | None = None
    memory_gb: float | None = None
    min_nodes: int = 0
    max_nodes: int = 1


@dataclass
class Ask:
    """`count` (min..max) units, each needing `cpus` and `gpus` on one node (and `gpu_memory_gb` on each GPU)."""

    stage: str
    what: str  # "teacher actor", "worker", ...
    setting: str  # the config key that sets the count, named in a refusal
    min: int
    max: int
    cpus: float
    gpus: float
    gpu_memory_gb: float | None = None  # what the unit keeps on each of its GPUs (weights, states), GB
    fits: int | None = None  # filled by `check`: how many units the cluster can hold at most
    note: str = ""


@dataclass
class StagePlan:
    stage: str
    entry: str  # label | sample | train | quantize | evaluate | serve
    asks: list[Ask] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)


def node_types(plain: dict[str, Any]) -> list[NodeType] | None:
    """The cluster's node types: `cluster.node_types`, else this machine for an embedded local Ray; None when a
    running cluster is joined without a description (nothing to check against)."""
    from pipeline.config import ClusterConfig
    from pipeline.runtime import is_embedded

    cluster = plain["cluster"]
    if cluster.get("node_types"):
        return [NodeType(name=name, **spec) for name, spec in cluster["node_types"].items()]
    if not is_embedded(ClusterConfig(**{k: v for k, v in cluster.items() if k != "node_types"})):
        return None
    return [NodeType("this machine", cpus=cluster.get("num_cpus") or os.cpu_count() or 1, gpus=_local_gpus(),
                     min_nodes=1, max_nodes=1)]


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _params(model: dict[str, Any]) -> float | None:
    """A model's parameters: `num_parameters` from config, else counted from its config.json on the meta device
    (a local directory, or a hub model already in the local cache: the plan reaches no hub)."""
    from pipeline.models.load import count_parameters, local_files

    if model.get("num_parameters"):
        return float(model["num_parameters"])
    folder = local_files(model["name_or_path"], model.get("revision"))
    if folder is None or not (folder / "config.json").exists():
        return None
    return float(count_parameters(folder))


def _weights_gb(model: dict[str, Any], on_gpu: bool) -> float | None:
    params = _params(model)
    if params is None or not on_gpu:
        return None
    return params * _BYTES[model.get("dtype", "auto")] / 1e9


def stage_asks(name: str, entry: str, c: dict[str, Any]) -> list[Ask]:
    """The asks of one chain stage from its derived config."""
    if entry == "label":
        lab, teacher = c["label"], c["teacher"]
        if lab["mode"] == "reference":  # no engine: CPU tasks only
            return []
        gpus = lab["num_gpus_per_actor"]
        return [Ask(name, "teacher actor", "label.concurrency", *lab["concurrency"], lab["num_cpus_per_actor"], gpus,
                    _engine_gb(teacher, gpus > 0, lab["engine"]))]
    if entry == "sample":
        s = c["sample"]
        return [Ask(name, "student actor", "sample.concurrency", *s["concurrency"], s["num_cpus_per_actor"],
                    s["num_gpus_per_actor"], _engine_gb(c["student"], s["num_gpus_per_actor"] > 0, s["engine"])),
                Ask(name, "teacher actor", "sample.scoring.concurrency", *s["scoring"]["concurrency"],
                    s["scoring"]["num_cpus_per_actor"], s["scoring"]["num_gpus_per_actor"],
                    _engine_gb(c["teacher"], s["scoring"]["num_gpus_per_actor"] > 0, c["label"]["engine"]))]
    if entry == "train":
        t, student = c["train"], c["student"]
        return [Ask(name, "worker", "train.num_workers", t["num_workers"], t["num_workers"], t["cpus_per_worker"],
                    1 if t["use_gpu"] else 0, _train_memory_gb(c) if t["use_gpu"] else None)]
    if entry == "quantize":
        q = c["quantize"]
        return [Ask(name, "task", "quantize.num_gpus", 1, 1, q["num_cpus"], q["num_gpus"])]
    if entry == "evaluate":
        ev, asks = c["evaluate"], []
        lo, hi = ev["concurrency"]
        for role in ("teacher", "student"):
            model = c[role]
            gpus = model["tensor_parallel_size"] if ev["use_gpu"] else 0
            asks.append(Ask(name, f"{role} generator", "evaluate.concurrency", lo, hi, ev["num_cpus_per_actor"], gpus,
                            _engine_gb(model, ev["use_gpu"], ev["engine"])))
        asks.append(Ask(name, "scorer", "evaluate.concurrency", 1, hi, ev["num_cpus_per_actor"],
                        1 if ev["use_gpu"] else 0, _weights_gb(c["student"], ev["use_gpu"])))
        return asks
    if entry == "serve":
        s, student = c["serve"], c["student"]
        tp = student["tensor_parallel_size"]
        a = s["autoscaling"]
        # a replica's engine workers are placed together (one bundle each, packed on one node)
        return [Ask(name, "replica", "serve.autoscaling.min_replicas", a["min_replicas"], a["max_replicas"],
                    s["num_cpus"] * tp, s["num_gpus"] * tp, _engine_gb(student, s["num_gpus"] > 0, s["engine"]))]
    raise ValueError(entry)


def _engine_gb(model: dict[str, Any], on_gpu: bool, engine: dict[str, Any]) -> float | None:
    """The GPU memory a vLLM engine needs on each of its GPUs for its share of the weights to take less than its
    memory share (gpu_memory_utilization), which must also hold the KV cache."""
    weights = _weights_gb(model, on_gpu)
    if weights is None:
        return None
    return weights / model["tensor_parallel_size"] / engine["gpu_memory_utilization"]


def _train_memory_gb(c: dict[str, Any]) -> float | None:
    """Per-GPU memory of the student's weights, gradients and Adam states under the configured ZeRO stage
    (activations not included): full bf16 training keeps 2 (weights) + 2 (gradients) + 12 (fp32 master weights and
    two moments) bytes a parameter, ZeRO-1 shards the 12, ZeRO-2 also the gradients, ZeRO-3 everything; LoRA
    keeps the frozen base (sharded by ZeRO-3 only) and tiny adapters."""
    params = _params(c["student"])
    if params is None:
        return None
    n, stage = c["train"]["num_workers"], c["deepspeed"]["zero_optimization"]["stage"]
    if c["train"]["method"] == "lora":
        return params * 2 / (n if stage == 3 else 1) / 1e9
    per = {0: 16, 1: 4 + 12 / n, 2: 2 + 14 / n, 3: 16 / n}[stage]
    return params * per / 1e9


def check(plan: list[StagePlan], nodes: list[NodeType] | None, gpu_types: dict[str, dict[str, Any]]) -> None:
    """Fill each ask's `fits` (units the cluster can hold at once at its largest); refuse a minimum that cannot
    be placed, with one sentence naming the stage and the shortfall."""
    if nodes is None:
        return
    for stage in plan:
        for ask in stage.asks:
            per_node = {node.name: _units(ask, node, gpu_types) for node in nodes}
            ask.fits = sum(per_node[node.name] * node.max_nodes for node in nodes)
            if ask.fits < ask.min:
                raise ConfigError(_shortfall(ask, nodes, gpu_types))
            if ask.fits < ask.max:
                ask.note = f"grows to {ask.fits} of {ask.max}: the cluster holds no more"


def _units(ask: Ask, node: NodeType, gpu_types: dict[str, dict[str, Any]]) -> int:
    if ask.gpus and ask.gpu_memory_gb and node.gpu_type in gpu_types:
        if ask.gpu_memory_gb > gpu_types[node.gpu_type]["memory_gb"]:
            return 0
    fits = [math.floor(node.cpus / ask.cpus + 1e-9) if ask.cpus else math.inf,
            math.floor(node.gpus / ask.gpus + 1e-9) if ask.gpus else math.inf]
    n = min(fits)
    return 0 if n == math.inf and not node.cpus and not node.gpus else int(min(n, 1 << 20))


def _shortfall(ask: Ask, nodes: list[NodeType], gpu_types: dict[str, dict[str, Any]]) -> str:
    unit = " and ".join(part for part in (f"{ask.cpus:g} CPU{'s' if ask.cpus != 1 else ''}" if ask.cpus else "",
                                          f"{ask.gpus:g} GPU{'s' if ask.gpus != 1 else ''}" if ask.gpus else "")
                        if part) or "nothing"
    biggest = max(nodes, key=lambda n: (n.gpus, n.cpus))
    if ask.gpus and not any(n.gpus >= ask.gpus for n in nodes):
        why = f"no node type has {ask.gpus:g} GPUs (the most is {biggest.gpus:g}, on {biggest.name})"
    elif ask.gpus and ask.gpu_memory_gb and all(n.gpu_type in gpu_types and ask.gpu_memory_gb >
                                                gpu_types[n.gpu_type]["memory_gb"] for n in nodes if n.gpus):
        memory = max(gpu_types[n.gpu_type]["memory_gb"] for n in nodes if n.gpus)
        why = (f"each needs {ask.gpu_memory_gb:.0f} GB on every GPU it uses and the largest GPU has {memory:g} GB "
               "(raise the tensor parallelism or ZeRO stage, or use larger GPUs)")
    elif ask.cpus and not any(n.cpus >= ask.cpus for n in nodes):
        why = f"no node type has {ask.cpus:g} CPUs (the most is {max(n.cpus for n in nodes):g})"
    else:
        why = f"the cluster holds at most {ask.fits} at once"
    return (f"The {ask.stage} stage cannot start: {ask.setting} asks for {ask.min} {ask.what}"
            f"{'s' if ask.min != 1 else ''} of {unit} each, but {why}; lower the ask or describe a larger cluster in "
            "cluster.node_types.")


def corpus_rows(plain: dict[str, Any]) -> int | None:
    """Rows to label: plan.corpus_rows, else the lines of local jsonl corpus files, else a bundled task's size."""
    if plain["plan"].get("corpus_rows"):
        return int(plain["plan"]["corpus_rows"])
    files = [Path(p) for p in plain["data"]["paths"] if "://" not in p and "*" not in p]
    if files and all(f.exists() and f.suffix in (".jsonl", ".json") for f in files):
        return sum(sum(1 for line in f.open("rb") if line.strip()) for f in files)
    build = plain["data"].get("build") or {}
    return int(build["num_rows"]) if build.get("num_rows") else None


def estimate(stage: StagePlan, c: dict[str, Any], rows: int | None, nodes: list[NodeType] | None) -> dict[str, Any]:
    """Tokens, hours, GPU-hours and storage of one stage (None where a figure is unknown, e.g. hours on CPUs)."""
    p = c["plan"]
    eff, gpu = p["efficiency"], _gpu_type(nodes, p["gpu_types"])
    peak = gpu["bf16_tflops"] * 1e12 if gpu else None
    prompt, response = p["prompt_tokens"], min(p["response_tokens"], c["label"]["max_response_tokens"])
    out: dict[str, Any] = {}
    if stage.entry == "label" and rows is not None:
        lab, teacher = c["label"], c["teacher"]
        scored = rows * response
        k_bytes = p["label_bytes_per_token"] * lab["k"] / 20
        out.update(tokens_scored=scored, storage_gb=scored * k_bytes / 1e9)
        params = _params(teacher)
        if lab["mode"] != "reference" and params and peak and lab["num_gpus_per_actor"]:
            gpus = lab["num_gpus_per_actor"]
            # per actor: prompts (and scored responses) at prefill speed, generated responses at decode speed
            prefill = eff["prefill"] * gpus * peak / (2 * params)
            decode = eff["decode"] * gpus * peak / (2 * params)
            seconds = rows * prompt / prefill + (rows * response / (decode if lab["mode"] == "generate" else prefill))
            _timed(out, stage.asks[0], seconds, gpus)
    elif stage.entry == "train" and rows is not None:
        t = c["train"]
        trained_rows = min(rows * (1 - c["heldout_fraction"]), t["max_rows"] or math.inf)
        tokens = trained_rows * min(prompt + response, t["max_seq_len"]) * t["epochs"]
        params = _params(c["student"])
        out.update(tokens_trained=tokens, storage_gb=_checkpoint_gb(c, params))
        if params and peak and t["use_gpu"]:
            # forward 2, backward 4 (2 without weight gradients: LoRA's frozen base), +2 to recompute activations
            flops = (4 if t["method"] == "lora" else 6) + (2 if t["gradient_checkpointing"] else 0)
            hours = tokens / (eff["train"] * peak / (flops * params) * t["num_workers"]) / 3600
            out.update(hours=hours, gpu_hours=hours * t["num_workers"])
    elif stage.entry == "quantize":
        params = _params(c["student"])
        if params:
            out["storage_gb"] = params * c["quantize"]["bits"] / 8 / 1e9
            if c["quantize"]["num_gpus"] and peak:
                _timed(out, stage.asks[0], eff["gptq_gpu_minutes_per_billion"] * params / 1e9 * 60, 1)
    elif stage.entry == "evaluate":
        ev, seconds, gpu_seconds = c["evaluate"], 0.0, 0.0
        for role, ask in zip(("teacher", "student"), stage.asks):
            params = _params(c[role])
            if not (params and peak and ev["use_gpu"]):
                return out
            gpus = c[role]["tensor_parallel_size"]
            rate = eff["decode"] * gpus * peak / (2 * params) * ask.min
            t = ev["num_rows"] * ev["max_response_tokens"] / rate
            seconds, gpu_seconds = seconds + t, gpu_seconds + t * gpus * ask.min
        out.update(hours=seconds / 3600, gpu_hours=gpu_seconds / 3600)
    elif stage.entry == "serve":  # runs until stopped: GPUs held per hour, at the fewest and most replicas
        ask = stage.asks[0]
        if ask.gpus:
            out["gpus_while_up"] = [ask.min * ask.gpus, ask.max * ask.gpus]
    return out


def _timed(out: dict[str, Any], ask: Ask, seconds: float, gpus_per_unit: float) -> None:
    """Hours when every unit the cluster can hold works at once (the pool's max, or what fits); `seconds` is the
    work of one unit alone."""
    units = min(ask.max, ask.fits) if ask.fits else ask.max
    hours = seconds / units / 3600
    out.update(hours=hours, gpu_hours=hours * units * gpus_per_unit)


def _checkpoint_gb(c: dict[str, Any], params: float | None) -> float | None:
    """Checkpoints kept (weights + Adam states for a full fine-tune) plus the saved student."""
    if params is None:
        return None
    full = c["train"]["method"] == "full"
    per_checkpoint = params * (16 if full else 0.02) / 1e9  # LoRA adapters: well under 1 % of the model
    return per_checkpoint * c["train"]["keep_checkpoints"] + (params * 2 / 1e9 if full else per_checkpoint)


def _gpu_type(nodes: list[NodeType] | None, gpu_types: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    for node in nodes or []:
        if node.gpus and node.gpu_type in gpu_types:
            return gpu_types[node.gpu_type]
    return None


def validate(entry: str, c: dict[str, Any]) -> None:
    """The stage's own config checks (contradictions such as a teacher split over more GPUs than its actors ask
    for, or bf16 training on CPUs), without loading a model."""
    from pipeline.config import evaluate_stage, label_stage, sample_stage, train_stage
    from pipeline.quantize.config import quantize_stage
    from pipeline.serve.config import serve_stage

    {"label": label_stage, "sample": sample_stage, "train": train_stage, "quantize": quantize_stage,
     "evaluate": evaluate_stage, "serve": serve_stage}[entry](c)


def make_plan(plain: dict[str, Any], chain: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """The whole plan of `chain` (stage name, entry, the config as derived for it; `pipeline.chain.plan_of` lists
    them): per stage its asks (checked against the cluster) and estimates, and the totals."""
    nodes = node_types(plain)
    rows = corpus_rows(plain)
    for _, entry, c in chain:
        validate(entry, c)
    plan = [StagePlan(name, entry, stage_asks(name, entry, c)) for name, entry, c in chain]
    check(plan, nodes, plain["plan"]["gpu_types"])
    for stage, (_, _, c) in zip(plan, chain):
        stage.estimate = estimate(stage, c, rows, nodes)
    gpu_hours = sum(s.estimate.get("gpu_hours") or 0 for s in plan)
    gpu = _gpu_type(nodes, plain["plan"]["gpu_types"]) or {}
    price = plain["plan"]["price_per_gpu_hour"] or gpu.get("usd_per_hour") or 0.0
    return {
        "run_name": plain.get("run_name"), "cluster": [asdict(n) for n in nodes] if nodes else None,
        "corpus_rows": rows, "stages": [asdict(s) for s in plan],
        "total": {"hours": sum(s.estimate.get("hours") or 0 for s in plan), "gpu_hours": gpu_hours,
                  "cost_usd": gpu_hours * price, "price_per_gpu_hour": price,
                  "storage_gb": sum(s.estimate.get("storage_gb") or 0 for s in plan)},
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a person reads it: one block per stage, then the totals."""
    lines = [f"plan: {plan['run_name']}, {plan['corpus_rows'] or 'unknown (set plan.corpus_rows)'} corpus rows"]
    if plan["cluster"] is None:
        lines.append("cluster: not described (cluster.node_types); whether the stages fit is not checked")
    else:
        lines.append("cluster: " + "; ".join(
            f"{n['name']}: {n['cpus']:g} CPUs, {n['gpus']:g} GPUs" + (f" {n['gpu_type']}" if n["gpu_type"] else "")
            + f", {n['min_nodes']}-{n['max_nodes']} nodes" for n in plan["cluster"]))
    for s in plan["stages"]:
        asks = "; ".join(_ask_text(a) for a in s["asks"]) or "CPU tasks only"
        lines.append(f"  {s['stage']:<13} {asks}")
        est = s["estimate"]
        figures = [f"{_count(est[k])} {label}" for k, label in (("tokens_scored", "tokens scored"),
                                                                 ("tokens_trained", "tokens trained")) if est.get(k)]
        if est.get("hours") is not None:
            figures.append(f"{est['hours']:.2f} h, {est['gpu_hours']:.1f} GPU-h")
        if est.get("storage_gb") is not None:
            figures.append(f"{est['storage_gb']:.1f} GB")
        if est.get("gpus_while_up"):
            low, high = est["gpus_while_up"]
            price = plan["total"]["price_per_gpu_hour"]
            figures.append(f"{low:g}-{high:g} GPUs while up: ${low * price:,.2f}-${high * price:,.2f} an hour")
        lines.append(f"  {'':<13} {', '.join(figures) or 'no estimate (CPU stage or unknown sizes)'}")
    t = plan["total"]
    cost = (f"{t['gpu_hours']:.0f} GPU-hours, ${t['cost_usd']:,.0f} at ${t['price_per_gpu_hour']}/GPU-hour"
            if t["price_per_gpu_hour"] else "no GPU-hours priced (CPU stages, or no price for the GPU type)")
    lines.append(f"total: {t['hours']:.1f} h of stages, {cost}, {t['storage_gb']:.0f} GB of artifacts")
    return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _ask_text(a: dict[str, Any]) -> str:
    count = str(a["min"]) if a["min"] == a["max"] else f"{a['min']}-{a['max']}"
    unit = f"{a['cpus']:g} CPU" + (f" + {a['gpus']:g} GPU" if a["gpus"] else "")
    memory = f", {a['gpu_memory_gb']:.0f} GB/GPU" if a["gpu_memory_gb"] else ""
    fits = "" if a["fits"] is None else f" (fits {min(a['fits'], a['max'])}{'; ' + a['note'] if a['note'] else ''})"
    return f"{count} {a['what']}{'s' if a['max'] != 1 else ''} x ({unit}{memory}){fits}"


def show(plan: dict[str, Any], fmt: str) -> None:
    """Print the plan as text or JSON (`plan.format`)."""
    import json

    if fmt not in ("text", "json"):
        raise ConfigError(f"plan.format={fmt!r} is not a format; use text or json.")
    print(json.dumps(plan, indent=2) if fmt == "json" else format_plan(plan), flush=True)
