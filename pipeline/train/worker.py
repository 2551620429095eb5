"""What each Ray Train worker runs: the student under DeepSpeed, fed sparse soft labels from Ray Data.

The worker receives a plain `WorkerSpec` (no DictConfig). DeepSpeed owns ZeRO partitioning, gradient
accumulation, clipping and checkpoint shards; Ray Train owns the process group, the data shard, metric
reports, checkpoint storage and restarts. Resume = DeepSpeed's checkpoint (weights, optimizer, scheduler,
step) plus skipping the micro-batches that step had consumed in its epoch.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class WorkerSpec:
    student: str
    revision: str | None  # a hub student's commit (pinned by the driver); None for a local directory
    precision: str  # bf16 | fp16 | fp32 (pipeline.config.training_precision)
    method: str
    lora: dict[str, Any]
    use_gpu: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    max_seq_len: int
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    grad_clip: float
    gradient_checkpointing: bool
    loss_chunk_tokens: int
    total_steps: int
    micro_per_epoch: int
    checkpoint_every: int
    report_every: int
    k: int
    loss: dict[str, Any]
    deepspeed: dict[str, Any]
    student_dir: str
    run_name: str  # the run root's name and the student folder under it: tags of the live figures
    model_name: str
    merge: bool
    seed: int
    sequence_parallel_size: int = 1
    cache_shard_mb: float = 0
    shuffle: bool = False
    eval_rows: dict[str, list] | None = None
    # on-policy rounds: the held-out prompts' samples of the student that sampled them, labeled by the teacher
    onpolicy_eval_rows: dict[str, list] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    optimizer: str = "adamw"
    galore: dict[str, Any] = field(default_factory=dict)
    # the online teacher (loss.weights online_kd, hidden or attention): its directory or hub id and revision
    teacher: str | None = None
    teacher_revision: str | None = None
    teacher_attn_implementation: str = "sdpa"
    teacher_placement: str = "device"


# train.lr_schedule -> the transformers schedule (each warms up linearly over train.warmup_steps first)
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def deepspeed_config(spec: WorkerSpec, world_size: int | None = None) -> dict[str, Any]:
    """The conf/deepspeed file completed with what the train config decides (one source for each value).

    A single process has no ranks to partition optimizer states or gradients across, so ZeRO-1/2 there only
    add their flat-buffer copies (measured ~12 % of a CPU step): it runs as stage 0, unless it offloads."""
    ds = dict(spec.deepspeed)
    zero = dict(ds.get("zero_optimization") or {})
    if world_size == 1 and zero.get("stage") in (1, 2) and not zero.get("offload_optimizer"):
        ds["zero_optimization"] = {**zero, "stage": 0}
    return {
        **ds,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "gradient_clipping": spec.grad_clip,
        "bf16": {"enabled": spec.precision == "bf16"},
        # fp16 keeps fp32 master weights and scales the loss dynamically (loss_scale 0) against underflow
        "fp16": {"enabled": spec.precision == "fp16", "loss_scale": 0},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_student(spec: WorkerSpec):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import storage

    storage.fetched(spec.student)  # a base model in a URI run root (a tiny one built there), on this node
    # loaded in the precision it trains in (DeepSpeed keeps fp32 master weights for bf16/fp16 in its optimizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.precision]
    # sdpa (the default): the attention Ulysses sequence parallelism wraps, and the fast one on CPU and GPU alike;
    # the attention term needs maps from its mapped layers (sdpa elsewhere)
    model = AutoModelForCausalLM.from_pretrained(spec.student, revision=spec.revision, dtype=dtype,
                                                 attn_implementation=attention_of(spec, spec.attn_implementation))
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=spec.lora["r"], lora_alpha=spec.lora["alpha"], lora_dropout=spec.lora["dropout"],
            target_modules=list(spec.lora["target_modules"]), task_type="CAUSAL_LM"))
    return model


def attention_of(spec: WorkerSpec, configured: str) -> str:
    """The attention implementation a model of this run loads with: its configured one, or, with the attention
    term, the one that keeps maps on the mapped layers."""
    if (spec.loss.get("weights") or {}).get("attention", 0) > 0:
        from pipeline.train.online import MAPS_ATTENTION, register_maps_attention

        register_maps_attention()
        return MAPS_ATTENTION
    return configured


def build_optimizer(model, spec: WorkerSpec):
    """AdamW over the trainable parameters, or GaLore's AdamW with the decoder's linear weights in a projected group
    (the GaLore paper's choice: attention and MLP matrices; embeddings, norms, the LM head and the feature
    projections keep full Adam moments)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer != "galore":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    from galore_torch import GaLoreAdamW

    blocks = model.get_decoder().layers
    projected = {id(m.weight) for m in blocks.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
    groups = [{"params": [p for p in params if id(p) not in projected]},
              {"params": [p for p in params if id(p) in projected], "rank": spec.galore["rank"],
               "update_proj_gap": spec.galore["update_proj_gap"], "scale": spec.galore["scale"], "proj_type": "std"}]
    return GaLoreAdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay, no_deprecation_warning=True)


def projectors_to_devices(optimizer) -> None:
    """After a resume: GaLore keeps each projection matrix in a `GaLoreProjector` object in the optimizer's state,
    which `load_state_dict` does not move with the tensors (DeepSpeed loads checkpoints onto the CPU); each goes to
    its parameter's device (a no-op for AdamW and on CPUs)."""
    for param, state in optimizer.state.items():
        projector = state.get("projector") if isinstance(state, dict) else None
        matrix = getattr(projector, "ortho_matrix", None)
        if isinstance(matrix, (list, tuple)):
            projector.ortho_matrix = [m.to(param.device) for m in matrix]
        elif matrix is not None:
            projector.ortho_matrix = matrix.to(param.device)


def optimizer_state_bytes(optimizer, params=None) -> int:
    """Bytes of an optimizer's state: every tensor it keeps per parameter, GaLore's projection matrices included
    (`params`: of these parameters only)."""
    import torch

    keep = None if params is None else {id(p) for p in params}
    total = 0
    for param, state in optimizer.state.items():
        if keep is not None and id(param) not in keep:
            continue
        for value in state.values():
            tensors = [value] if torch.is_tensor(value) else [getattr(value, "ortho_matrix", None)]
            for t in tensors:
                for part in (t if isinstance(t, (list, tuple)) else [t]):
                    if torch.is_tensor(part):
                        total += part.numel() * part.element_size()
    return total


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce (`deepspeed_shm_comm`) at its first start in every
    environment: a C++ build of a minute or more on two cores, under a file lock that a killed build leaves behind
    (every later start then waits on it). Only DeepSpeed's inference all-reduce uses it; training reduces through
    the process group (gloo). So it is marked unavailable and never built (DeepSpeed 0.19: `build_shm_op` skips an
    op its `__compatible_ops__` marks false)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train_loop(config: dict[str, Any]) -> None:
    spec = WorkerSpec(**config)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.use_gpu else "cpu")
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import get_scheduler

    from pipeline.losses.kd import configured_loss
    from pipeline.data.batches import collate, collate_pairs
    from pipeline.monitoring import Recorder
    from pipeline.train import sequence_parallel as sp

    if not spec.use_gpu:
        skip_shm_comm_build()
    torch.manual_seed(spec.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model = build_student(spec)
    sp_size, mpu = spec.sequence_parallel_size, None
    if sp_size > 1:
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts Ray Train's process group
        mpu = sp.register(model, sp_size, spec.micro_batch_size)
    objective = spec.loss.get("objective", "distill")
    # DPO and KTO: the starting student, frozen, as the reference (LoRA: the same model with its adapter off)
    frozen = build_student(replace(spec, method="full", gradient_checkpointing=False)).eval().requires_grad_(False) \
        if objective != "distill" and spec.method == "full" else None
    if frozen is not None and spec.use_gpu:
        frozen.to(torch.device("cuda", torch.cuda.current_device()))
    online = OnlineTeacher(model, spec, rank) if spec.teacher else None
    optimizer = build_optimizer(model, spec)
    scheduler = get_scheduler(SCHEDULES[spec.lr_schedule], optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=spec.total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
                                           config=deepspeed_config(spec, dist.get_world_size()),
                                           dist_init_required=False)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
        projectors_to_devices(optimizer)
        if rank == 0:
            print(f"train: resuming from the checkpoint of step {engine.global_steps}", flush=True)
    pad = getattr(model.config, "pad_token_id", None) or 0
    hidden = DecoderOutput(model) if spec.loss_chunk_tokens else None
    no_logits = {"logits_to_keep": torch.empty(0, dtype=torch.long)} if hidden else {}  # the loss makes its own
    zero3 = spec.deepspeed.get("zero_optimization", {}).get("stage", 0) == 3
    shard = ray.train.get_dataset_shard("train")
    consumed = engine.global_steps * spec.gradient_accumulation_steps
    metrics_path = Path(spec.student_dir) / "metrics.jsonl"
    if rank == 0:  # at a URI run root, what rank 0's node holds of the student is what the run root holds
        from pipeline import storage

        storage.pull(spec.student_dir)
    figures = Recorder("train", spec.run_name) if rank == 0 else None
    data_ranks = dist.get_world_size() // sp_size  # each sequence-parallel group counts once
    heldout = partial(evaluate_heldout, engine, spec, mpu, data_ranks, pad, rank, online)
    if engine.global_steps == 0:
        heldout()
    epochs = ShardEpochs(shard, spec.micro_batch_size, spec.cache_shard_mb,
                         seed=(spec.seed, rank) if spec.shuffle else None)
    t0, tokens_since = time.perf_counter(), 0
    while engine.global_steps < spec.total_steps:
        epoch, skip = divmod(consumed, spec.micro_per_epoch)
        batches = epochs.next(epoch)
        if mpu is not None:
            batches = sp.exchange(batches, mpu.get_sequence_parallel_group(), sp_size)
        for i, rows in enumerate(batches):
            if i < skip:  # consumed before the checkpoint this run resumed from
                continue
            if objective != "distill":  # DPO, KTO: pairs of whole sequences, no sequence parallelism
                batch = on_device(collate_pairs(rows, spec.max_seq_len, pad, mismatched=objective == "kto"), engine)
                losses, weight = preference_losses(engine, frozen, batch, spec.loss), 1.0
            else:
                batch = collate(rows, k=spec.k, max_seq_len=spec.max_seq_len, pad_id=pad)
                if mpu is not None:
                    batch = sp.split(batch, mpu.get_sequence_parallel_rank(), sp_size, spec.micro_batch_size)
                batch = on_device(batch, engine)
                if mpu is None:
                    weight = 1.0
                    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_logits)
                    logits = (hidden.value if hidden else out.logits)[:, :-1]
                else:
                    weight = sp.loss_weight(batch["loss_mask"], batch["total_tokens"])
                    out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **no_logits)
                    logits = hidden.value if hidden else out.logits
                if hidden:  # the decoder's hidden states; the loss applies the LM head chunk by chunk
                    chunks = _most_chunks(batch["loss_mask"], spec.loss_chunk_tokens) if zero3 else None
                    losses = configured_loss(logits, batch, spec.loss, model.get_output_embeddings(),
                                             spec.loss_chunk_tokens, chunks, partitioned=zero3)
                else:
                    losses = configured_loss(logits, batch, spec.loss)
                if online is not None:
                    losses = online.add_terms(losses, batch, None if hidden else logits)
            engine.backward(losses["loss"] * (weight * sp_size))
            if online is not None:
                online.release()
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            consumed += 1
            tokens_since += int(batch["loss_mask"].sum())
            if not boundary:
                continue
            step = engine.global_steps
            names = list(losses)  # loss, ce, kd (distill); loss, reward_margin, reward_accuracy (dpo, kto)
            stats = torch.tensor([losses[n].item() * weight for n in names] + [tokens_since], dtype=torch.float64)
            stats = all_reduce(stats)
            elapsed = time.perf_counter() - t0
            metrics = {"step": step, "epoch": epoch, **{n: stats[i].item() / data_ranks for i, n in enumerate(names)},
                       "lr": scheduler.get_last_lr()[0], "grad_norm": _float(engine.get_global_grad_norm()),
                       "tokens_per_s": stats[-1].item() / elapsed}
            t0, tokens_since = time.perf_counter(), 0
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                for name, key in (("train_step", "step"), ("train_loss", "loss"), ("train_kd_loss", "kd"),
                                  ("train_tokens_per_s", "tokens_per_s")):
                    if key in metrics:
                        figures.set(name, metrics[key], model=spec.model_name)
            last = step >= spec.total_steps
            if step % spec.checkpoint_every == 0 or last:
                if rank == 0:  # at a URI run root, the curves so far outlive this node with the checkpoint
                    from pipeline import storage

                    for log in (metrics_path, metrics_path.with_name("eval.jsonl")):
                        if log.exists():
                            storage.published(log)
                _report_with_checkpoint(engine, metrics)
            elif step % spec.report_every == 0:  # each report syncs the workers and waits for a poll: not every step
                ray.train.report(metrics)
            if rank == 0 and (step % spec.report_every == 0 or last):
                detail = (f"kd {metrics['kd']:.4f}" if "kd" in metrics else
                          f"reward margin {metrics['reward_margin']:.4f} accuracy {metrics['reward_accuracy']:.2f}")
                print(f"step {step}/{spec.total_steps} loss {metrics['loss']:.4f} {detail} "
                      f"{metrics['tokens_per_s']:.0f} tokens/s", flush=True)
            if last:
                break
    heldout()
    _save_student(engine, spec, rank, online.pairs if online else None)


class OnlineTeacher:
    """The teacher alive in the worker for the online terms (`pipeline.losses.features`), and the student's side of
    them: the taps on both models, the layer pairs and the student's projections (a submodule of the student while it
    trains, so DeepSpeed optimizes and checkpoints them; saved beside it at the end)."""

    def __init__(self, model, spec: WorkerSpec, rank: int):
        import torch

        from pipeline.losses.features import layer_pairs
        from pipeline.train.online import Taps, build_projections, load_teacher, widths

        self.weights = {k: v for k, v in spec.loss["weights"].items() if v > 0}
        self.loss = spec.loss
        device = torch.device("cuda", torch.cuda.current_device()) if spec.use_gpu else torch.device("cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.precision]
        ds = {"train_micro_batch_size_per_gpu": spec.micro_batch_size, "bf16": {"enabled": spec.precision == "bf16"},
              "fp16": {"enabled": spec.precision == "fp16"}, "steps_per_print": 1 << 30}
        self.forward, module, held = load_teacher(spec.teacher, spec.teacher_revision, dtype, spec.teacher_placement,
                                                  attention_of(spec, spec.teacher_attn_implementation), device, ds)
        (s_layers, s_width, _), (t_layers, t_width, _) = widths(model), widths(module)
        self.pairs = layer_pairs(s_layers, t_layers, spec.loss.get("layer_map"))
        hidden = "hidden" in self.weights
        maps = "attention" in self.weights
        self.projections = build_projections(self.pairs, s_width, t_width) if hidden else None
        if self.projections is not None and any(True for _ in self.projections.parameters()):
            model.add_module(PROJECTIONS_MODULE, self.projections)
        mine, theirs = [s for s, _ in self.pairs], [t for _, t in self.pairs]
        self.student = Taps(model, mine if hidden else [], mine if maps else [])
        self.teacher = Taps(module, theirs if hidden else [], theirs if maps else [])
        if rank == 0:
            print(f"train: online teacher {spec.teacher} ({spec.teacher_placement}): {held / 2**20:.1f} MiB of its "
                  f"weights on this worker; terms {', '.join(self.weights)}; block pairs {self.pairs}", flush=True)

    def release(self) -> None:
        self.student.release()
        self.teacher.release()

    def add_terms(self, losses: dict[str, Any], batch: dict[str, Any], logits) -> dict[str, Any]:
        """The offline loss (`losses`, from `configured_loss`) and the online terms, weighted and summed; every term
        kept for the metrics. `logits`: the student's shifted logits ([B, S-1, V]); None under the fused LM head."""
        import torch

        from pipeline.losses.features import feature_terms

        with torch.no_grad():
            out = self.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        teacher = self.teacher.features(out.logits[:, :-1])
        student = self.student.features(logits)
        terms = feature_terms(self.weights, batch["loss_mask"], batch["attention_mask"], student, teacher, self.pairs,
                              self.projections, self.loss)
        total = self.weights.get("offline", 0) * losses["loss"] + sum(self.weights[n] * v for n, v in terms.items())
        return {"loss": total, **{k: v for k, v in losses.items() if k != "loss"}, "offline": losses["loss"], **terms}


# the student's submodule holding the hidden-state projections while it trains
PROJECTIONS_MODULE = "distill_projections"


def preference_losses(engine, frozen, batch, loss: dict[str, Any]) -> dict[str, Any]:
    """DPO or KTO on a micro-batch of pairs (`collate_pairs`: chosen sequences, then rejected ones): the policy's
    summed completion log-probabilities with gradients, the reference's without. The reference is the starting
    student: `frozen` (full fine-tuning), or the policy with its LoRA adapter switched off. KTO's reference point is
    averaged over the data-parallel ranks, as TRL gathers it over processes.
    Returns {"loss", "reward_margin", "reward_accuracy"} (reward margin: the chosen minus the rejected implicit
    reward, β·log π/π_ref)."""
    import torch
    import torch.distributed as dist

    from pipeline.losses.preference import dpo_loss, kto_loss, sequence_logprobs

    def logps(forward, prefix: str = "") -> torch.Tensor:
        logits = forward(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"]).logits
        return sequence_logprobs(logits[:, :-1], batch[f"{prefix}labels"], batch[f"{prefix}loss_mask"])

    def reference(prefix: str = "") -> torch.Tensor:
        with torch.no_grad():
            if frozen is not None:
                return logps(frozen, prefix)
            with engine.module.disable_adapter():  # through the engine, as TRL does: ZeRO-3's hooks see one order
                return logps(engine, prefix)

    policy, ref = logps(engine), reference()
    b = policy.shape[0] // 2
    beta = loss["beta"]
    if loss["objective"] == "dpo":
        tokens = batch["loss_mask"].sum(-1)
        out = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=beta, variant=loss["variant"],
                       label_smoothing=loss["label_smoothing"], chosen_tokens=tokens[:b], rejected_tokens=tokens[b:])
    else:
        with torch.no_grad():
            gap = (logps(engine, "kl_") - reference("kl_")).mean()
        gap = all_reduce(gap)  # TRL's `kto_reference_point` over every rank's batch
        z0 = (gap / dist.get_world_size()).clamp(min=0)
        desirable = torch.arange(2 * b, device=policy.device) < b
        out = kto_loss(policy, ref, desirable, z0, beta=beta,
                       desirable_weight=loss["desirable_weight"], undesirable_weight=loss["undesirable_weight"])
    return {"loss": out["loss"], "reward_margin": out["chosen_reward"] - out["rejected_reward"],
            "reward_accuracy": out["reward_accuracy"]}


def on_device(batch: dict[str, Any], engine) -> dict[str, Any]:
    """A collated batch (CPU tensors) on the engine's device (a no-op on CPUs)."""
    return {k: v.to(engine.device) if hasattr(v, "to") else v for k, v in batch.items()}


def all_reduce(tensor, op=None):
    """`dist.all_reduce` of a small CPU tensor (counts, sums), returned on the CPU: under NCCL (GPU workers) the
    reduction runs on this rank's GPU, which is the only device NCCL reduces on."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op if op is not None else dist.ReduceOp.SUM)
    return moved.to(tensor.device)


class DecoderOutput:
    """The decoder's last hidden states of the latest forward pass (a forward hook on the model's decoder), for the
    fused loss, which applies the LM head itself; the model is then asked for no logits (`logits_to_keep` an empty
    index), so neither its forward pass nor DeepSpeed's hooks around it change."""

    def __init__(self, model):
        self.value = None
        model.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:  # noqa: ARG002 - hook signature
        self.value = output[0]


def _most_chunks(mask, chunk_tokens: int) -> int:
    """The most chunks any rank's fused loss runs for this micro-batch: under ZeRO-3 every call of the LM head
    gathers its weight from all ranks, so every rank makes the same number of calls."""
    import math

    import torch
    import torch.distributed as dist

    count = torch.tensor([math.ceil(int((mask > 0).sum()) / chunk_tokens)], dtype=torch.long)
    count = all_reduce(count, dist.ReduceOp.MAX)
    return int(count.item())


def evaluate_heldout(engine, spec: WorkerSpec, mpu, data_ranks: int, pad: int, rank: int, online=None) -> None:
    """`evaluate_rows` on the held-out labels, and in an on-policy round on the held-out prompts' samples too."""
    evaluate_rows(engine, spec, mpu, data_ranks, pad, rank, spec.eval_rows, "labels")
    evaluate_rows(engine, spec, mpu, data_ranks, pad, rank, spec.onpolicy_eval_rows, "samples")
    if online is not None:
        online.release()


def evaluate_rows(engine, spec: WorkerSpec, mpu, data_ranks: int, pad: int, rank: int, eval_rows, on: str) -> None:
    """Top-1 agreement, KL to the teacher and perplexity on held-out rows (`on`: the teacher's labels, or the
    student's samples labeled by the teacher), appended to eval.jsonl.

    Every rank holds the same rows in the same order (they come with the spec, not from a data shard), so
    ZeRO-3 gathers and sequence-parallel all-to-alls line up; summed over ranks, each row counts
    `data_ranks` times."""
    if not eval_rows:
        return
    import torch

    from pipeline.metrics import summarize, teacher_forced_sums
    from pipeline.train import sequence_parallel as sp
    from pipeline.data.batches import collate

    rows = {key: np.asarray(value, dtype=object) for key, value in eval_rows.items()}
    n = len(next(iter(rows.values())))
    sums = torch.zeros(4, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for start in range(0, n, spec.micro_batch_size):
            batch = collate({k: v[start:start + spec.micro_batch_size] for k, v in rows.items()}, k=spec.k,
                            max_seq_len=spec.max_seq_len, pad_id=pad)
            if mpu is not None:
                batch = sp.split(batch, mpu.get_sequence_parallel_rank(), spec.sequence_parallel_size,
                                 spec.micro_batch_size)
            batch = on_device(batch, engine)
            if mpu is None:
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            else:
                logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            part = teacher_forced_sums(logits, batch["labels"], batch["loss_mask"], batch["teacher_ids"],
                                       batch["teacher_logprobs"], batch["teacher_tail"])
            sums += torch.tensor([part["tokens"], part["agree"], part["kl"], part["nll"]], dtype=torch.float64)
    engine.train()
    sums = all_reduce(sums)
    sums /= data_ranks
    result = {"step": engine.global_steps, "rows": n, **({"on": on} if on != "labels" else {}),
              **summarize(dict(zip(("tokens", "agree", "kl", "nll"), sums.tolist())))}
    if rank == 0:
        with (Path(spec.student_dir) / "eval.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        what = "held-out" if on == "labels" else "held-out prompts' samples"
        print(f"train: {what} at step {result['step']}: top-1 agreement {result['top1_agreement']:.3f}, "
              f"KL to teacher {result['kl_to_teacher']:.4f}, perplexity {result['perplexity']:.2f}", flush=True)


class ShardEpochs:
    """One epoch of the worker's shard after another, replayed from memory once a full pass fits in
    `budget_mb` on every worker.

    Each new epoch of a streaming split restarts Ray Data's execution behind a barrier across the workers
    (1-2 s on a small machine), which for a small corpus costs more than the epoch's training. Whether to keep
    a pass is decided by all workers together: one worker leaving the split while another still reads it would
    hang. With a `seed`, every replayed epoch is a fresh permutation of the kept rows (taken in id order), a pure
    function of (seed, epoch) and the rows: many passes over a small transfer set in one fixed order train a
    worse student. A run that resumes after the first epoch reads its pass whole before the resumed epoch, so
    it sees that epoch's order when its worker holds the same rows.
    """

    def __init__(self, shard, size: int, budget_mb: float, seed: tuple[int, int] | None = None):
        self.shard, self.size, self.budget, self.seed = shard, size, budget_mb * 2**20, seed
        self.kept: list[dict[str, Any]] | None = None
        self.rows: dict[str, list] | None = None  # the kept pass as columns in id order, built once

    def next(self, epoch: int):
        if self.kept is None and self.seed is not None and epoch > 0:
            for _ in self._read():  # a resumed run: keep the pass (if it fits) so this epoch is permuted
                pass
        if self.kept is None:
            return self._read()
        if self.seed is None:
            return iter(self.kept)
        return self._permuted(epoch)

    def _permuted(self, epoch: int):
        if self.rows is None:
            # one value per row (a column may come as a 2-D array in one micro-batch and as objects in another),
            # in id order, so the permutation does not depend on the order Ray Data read the rows in
            columns = {key: [row for b in self.kept for row in b[key]] for key in self.kept[0]}
            n = len(next(iter(columns.values())))
            base = sorted(range(n), key=lambda i: _row_key(columns, i)) if "id" in columns else range(n)
            self.rows = {key: [value[i] for i in base] for key, value in columns.items()}
        n = len(next(iter(self.rows.values())))
        order = np.random.default_rng([*self.seed, epoch]).permutation(n)
        for start in range(0, n, self.size):
            rows = order[start:start + self.size]
            yield {key: [value[i] for i in rows] for key, value in self.rows.items()}

    def _read(self):
        import torch
        import torch.distributed as dist

        kept, nbytes = [], 0
        for batch in micro_batches(self.shard, self.size):
            if kept is not None:
                nbytes += _nbytes(batch)
                kept = kept if nbytes <= self.budget else None
                if kept is not None:
                    kept.append(batch)
            yield batch
        fits = torch.tensor([int(kept is not None)])
        fits = all_reduce(fits, dist.ReduceOp.MIN)  # every worker ends its pass here, at the same step
        if fits.item():
            self.kept = kept


def _row_key(columns: dict[str, list], i: int) -> tuple:
    """A row's place in id order, its content breaking ties: an id repeats in an on-policy mix (the teacher's row and
    the student's samples) and in pairs, and rows of one id must not be ordered by how Ray Data read them."""
    content = tuple(np.asarray(columns[key][i]).tobytes() for key in sorted(columns) if key != "id")
    return columns["id"][i], content


def _nbytes(batch: dict[str, np.ndarray]) -> int:
    """Bytes of a numpy micro-batch, counting what its object columns (one array per row) point to."""
    total = 0
    for value in batch.values():
        total += value.nbytes
        if value.dtype == object:
            total += sum(getattr(x, "nbytes", 0) for x in value)
    return total


def micro_batches(shard, size: int, fetch: int = 16):
    """The worker's data shard as numpy micro-batches of `size` rows, fetched `fetch` micro-batches at a time:
    every fetch from a streaming split is a round trip to its coordinator, so fetching one micro-batch at a
    time would make a small model wait on the network."""
    for rows in shard.iter_batches(batch_size=size * fetch, batch_format="numpy", prefetch_batches=2):
        n = len(next(iter(rows.values())))
        for start in range(0, n, size):
            yield {key: value[start:start + size] for key, value in rows.items()}


def _float(x) -> float | None:
    return None if x is None else float(x)


def _report_with_checkpoint(engine, metrics: dict[str, Any]) -> None:
    """Every rank saves its DeepSpeed shards into its own folder; Ray Train merges them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _save_student(engine, spec: WorkerSpec, rank: int, pairs: list[tuple[int, int]] | None = None) -> None:
    """The student as an HF directory: the adapter (LoRA) or full weights, merged weights on request; the hidden-state
    projections of the block `pairs` beside them."""
    import deepspeed

    module = engine.module
    stage3 = engine.zero_optimization_stage() == 3
    ctx = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if stage3
           else contextlib.nullcontext())
    with ctx:
        if rank != 0:
            return
        out = Path(spec.student_dir)
        projections = module._modules.pop(PROJECTIONS_MODULE, None)  # saved beside the student, not in its weights
        if projections is not None:
            from pipeline.train.online import save_projections

            save_projections(projections, pairs, out)
        module.save_pretrained(out / ("adapter" if spec.method == "lora" else "model"))
        if spec.method == "lora" and spec.merge:
            import copy

            copy.deepcopy(module).merge_and_unload().save_pretrained(out / "model")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.student, revision=spec.revision)
        for sub in ("adapter", "model"):
            if (out / sub).exists():
                tokenizer.save_pretrained(out / sub)
        from pipeline.data.schema import write_json_atomic

        from pipeline import storage

        storage.push(out)  # at a URI run root, from the node that saved it
        write_json_atomic(out / "lineage.json", spec.lineage)  # written last: the chain's mark that train finished
