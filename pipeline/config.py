"""Typed stage configs: the driver resolves the Hydra tree once and hands workers plain dataclasses.

Ray rejects `DictConfig` in actors and `${...}` interpolations do not resolve in workers, so each stage
takes its subtree through `to_dataclass`: an OmegaConf structured config of the dataclass checks every key and
value type, and an unknown key, a missing one or a wrong type is one clear sentence before any work starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError


@dataclass
class PathsConfig:
    root: str
    run_root: str
    models_dir: str
    data_dir: str
    labels_dir: str
    rejected_dir: str
    student_dir: str
    train_storage: str
    quantized_dir: str
    eval_dir: str
    samples_dir: str
    pairs_dir: str

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if "://" in value and "://" in self.run_root:
                raise ConfigError(f"paths.run_root={self.run_root} is a URI, which the ray_jobs entrypoints open "
                                  "through a local mirror (pipeline/storage.py); run the stage through its entrypoint.")
            if "://" in value:  # pathlib would make s3://b/p a local folder named "s3:"
                raise ConfigError(
                    f"paths.{name}={value} is a URI under a local paths.run_root ({self.run_root}); give the URI as "
                    "paths.root or paths.run_root (the ray_jobs entrypoints work on a URI run root through a local "
                    "mirror) and leave the other paths.* under it.")


@dataclass
class ClusterConfig:
    address: str | None = None
    num_cpus: int | None = None
    metrics_export_port: int | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    # node type -> {cpus, gpus, gpu_type, memory_gb, min_nodes, max_nodes} (ray_jobs/plan.py); None: this machine
    node_types: dict[str, dict[str, Any]] | None = None


DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class ModelConfig:
    name_or_path: str
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    build: dict[str, Any] | None = None
    # parameters (from the model card) for ray_jobs/plan.py's memory and time estimates; null: read from the model
    num_parameters: float | None = None
    # transformers' attention where the model trains or teaches online (vLLM picks its own): sdpa | eager |
    # flash_attention_2 (CUDA only)
    attn_implementation: str = "sdpa"

    def validate(self, role: str) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"{role}.dtype={self.dtype!r} is not a dtype; use one of {', '.join(DTYPES)}.")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"{role}.attn_implementation={self.attn_implementation!r} is not one of "
                              f"{', '.join(ATTN_IMPLEMENTATIONS)}.")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"{role}.tensor_parallel_size={self.tensor_parallel_size} must be at least 1.")


def training_precision(student: ModelConfig, use_gpu: bool) -> str:
    """bf16, fp16 or fp32: the student's dtype (auto: bf16 on GPUs, fp32 on CPUs) as DeepSpeed trains it."""
    return {"auto": "bf16" if use_gpu else "fp32", "bfloat16": "bf16", "float16": "fp16",
            "float32": "fp32"}[student.dtype]


@dataclass
class DataConfig:
    paths: list[str]
    build: dict[str, Any] | None = None


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = 0


@dataclass
class EngineConfig:
    gpu_memory_utilization: float = 0.9
    max_logprobs: int = 20
    max_num_seqs: int = 256
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    in_process: bool = False

    def validate(self, stage: str, *models: ModelConfig) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{stage}.engine.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1].")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"{stage}.engine.kv_cache_memory_bytes={self.kv_cache_memory_bytes} must be a positive "
                              "number of bytes, or null for a share of memory (gpu_memory_utilization).")
        for model in models:
            if self.in_process and model.tensor_parallel_size > 1:
                raise ConfigError(f"{stage}.engine.in_process runs one worker in the actor, but {model.name_or_path} "
                                  f"has tensor_parallel_size={model.tensor_parallel_size}; set "
                                  f"{stage}.engine.in_process=false.")


@dataclass
class LabelConfig:
    mode: str = "generate"
    k: int = 20
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 512
    batch_size: int = 64
    concurrency: tuple[int, int] = (1, 4)
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    prepare_batch_size: int = 512
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    overwrite: bool = False

    def validate(self, teacher: ModelConfig) -> None:
        """Everything about labeling that can be wrong before a model is loaded."""
        if self.mode not in ("generate", "score", "reference"):
            raise ConfigError(f"label.mode={self.mode!r} is not a mode; use generate, score or reference.")
        self.engine.validate("label", teacher)
        if self.k < 1:
            raise ConfigError(f"label.k={self.k} must be at least 1.")
        if self.k > self.engine.max_logprobs:
            raise ConfigError(
                f"label.k={self.k} is larger than the engine allows (label.engine.max_logprobs="
                f"{self.engine.max_logprobs}); lower label.k or raise label.engine.max_logprobs.")
        if self.max_prompt_tokens + 1 > teacher.max_model_len:
            raise ConfigError(
                f"label.max_prompt_tokens={self.max_prompt_tokens} leaves no room for a response within the "
                f"teacher's max_model_len={teacher.max_model_len}; lower one or raise the other.")
        lo, hi = self.concurrency
        if not 1 <= lo <= hi:
            raise ConfigError(f"label.concurrency={list(self.concurrency)} must be [min, max] with 1 <= min <= max.")
        tp, gpus = teacher.tensor_parallel_size, self.num_gpus_per_actor
        if self.mode != "reference" and (tp > 1 or gpus > 1) and gpus != tp:  # reference mode runs no teacher
            raise ConfigError(
                f"teacher.tensor_parallel_size={tp} spreads the teacher over {tp} GPU{'s' if tp > 1 else ''} per "
                f"actor, but label.num_gpus_per_actor={gpus:g}; set label.num_gpus_per_actor to the teacher's "
                "tensor_parallel_size (the presets interpolate ${teacher.tensor_parallel_size}).")
        if self.batch_size < 1 or self.prepare_batch_size < 1:
            raise ConfigError("label.batch_size and label.prepare_batch_size must be positive.")
        if self.mode == "generate" and not 0 <= self.sampling.temperature:
            raise ConfigError(f"label.sampling.temperature={self.sampling.temperature} must be >= 0.")
        if not 0 < self.sampling.top_p <= 1:
            raise ConfigError(f"label.sampling.top_p={self.sampling.top_p} must be in (0, 1].")


@dataclass
class LabelStage:
    """Everything the label stage reads, resolved and typed."""

    paths: PathsConfig
    cluster: ClusterConfig
    teacher: ModelConfig
    data: DataConfig
    label: LabelConfig


@dataclass
class ScoringPool:
    """The teacher actors that score the student's samples (the label stage's engine settings, their own pool)."""

    concurrency: tuple[int, int] = (1, 4)
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0


SAMPLED_MODELS = ("trained", "base")


@dataclass
class StudentSampling:
    """The student's sampling in the sample stage: its own distribution (T=1, no nucleus cut) unless told otherwise."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0


@dataclass
class SampleConfig:
    model: str = "trained"
    n: int = 4
    max_response_tokens: int = 512
    batch_size: int = 64
    concurrency: tuple[int, int] = (1, 4)
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    sampling: StudentSampling = field(default_factory=StudentSampling)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scoring: ScoringPool = field(default_factory=ScoringPool)
    overwrite: bool = False

    def validate(self, student: ModelConfig, teacher: ModelConfig) -> None:
        if self.model not in SAMPLED_MODELS:
            raise ConfigError(f"sample.model={self.model!r} is not one of {', '.join(SAMPLED_MODELS)} (the student "
                              "the train stage wrote under paths.student_dir, or the configured student itself).")
        self.engine.validate("sample", student)
        if self.n < 1 or self.max_response_tokens < 1 or self.batch_size < 1:
            raise ConfigError("sample.n, sample.max_response_tokens and sample.batch_size must be at least 1.")
        if self.sampling.temperature <= 0:
            raise ConfigError(f"sample.sampling.temperature={self.sampling.temperature} must be positive: greedy "
                              "decoding would give every one of a prompt's samples the same tokens.")
        if not 0 < self.sampling.top_p <= 1:
            raise ConfigError(f"sample.sampling.top_p={self.sampling.top_p} must be in (0, 1].")
        for name, pool, tp in (("sample", self, student.tensor_parallel_size),
                               ("sample.scoring", self.scoring, teacher.tensor_parallel_size)):
            lo, hi = pool.concurrency
            if not 1 <= lo <= hi:
                raise ConfigError(f"{name}.concurrency={list(pool.concurrency)} must be [min, max] with 1 <= min <= max.")
            if (tp > 1 or pool.num_gpus_per_actor > 1) and pool.num_gpus_per_actor != tp:
                raise ConfigError(f"{name}.num_gpus_per_actor={pool.num_gpus_per_actor:g} must equal the model's "
                                  f"tensor_parallel_size={tp}.")


@dataclass
class SampleStage:
    """Everything the sample stage reads: the student samples the corpus's prompts, the teacher scores them."""

    paths: PathsConfig
    cluster: ClusterConfig
    teacher: ModelConfig
    student: ModelConfig
    data: DataConfig
    label: LabelConfig
    sample: SampleConfig


@dataclass
class PairsConfig:
    per_prompt: int = 1

    def validate(self) -> None:
        if self.per_prompt < 1:
            raise ConfigError(f"pairs.per_prompt={self.per_prompt} must be at least 1.")


@dataclass
class PairsStage:
    paths: PathsConfig
    pairs: PairsConfig


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class GaloreConfig:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25


OPTIMIZERS = ("adamw", "galore")
TEACHER_PLACEMENTS = ("device", "zero3", "cpu_offload")


def train_settings_in_use(train: dict[str, Any]) -> dict[str, Any]:
    """A `train` group's settings, `galore` left out unless train.optimizer=galore: they change nothing else (what a
    train stage's fingerprint and its checkpoints' resume record hold)."""
    return {k: v for k, v in train.items() if not (k == "galore" and train.get("optimizer", "adamw") != "galore")}


@dataclass
class TrainConfig:
    method: str = "lora"
    num_workers: int = 2
    cpus_per_worker: float = 1
    use_gpu: bool = True
    epochs: int = 1
    max_steps: int | None = None
    max_rows: int | None = None
    onpolicy_fraction: float = 0.0
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 1024
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: str = "adamw"
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    teacher_placement: str = "device"
    checkpoint_every: int = 50
    report_every: int = 10
    report_poll_s: float = 0.2
    cache_shard_mb: float = 512
    shuffle: bool = True
    keep_checkpoints: int = 2
    max_failures: int = 1
    merge: bool = False
    seed: int = 0
    sequence_parallel_size: int = 1
    max_eval_rows: int = 256
    overwrite: bool = False

    def validate(self, student: ModelConfig | None = None) -> None:
        if student is not None and not self.use_gpu and training_precision(student, False) != "fp32":
            raise ConfigError(f"student.dtype={student.dtype} trains in {training_precision(student, True)} on GPUs "
                              "only, but train.use_gpu=false trains on CPUs (in float32); set train.use_gpu=true, or "
                              "student.dtype=float32 (or auto) to train on CPUs.")
        if self.method not in ("lora", "full"):
            raise ConfigError(f"train.method={self.method!r} is not a method; use lora or full.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}.")
        if self.optimizer == "galore" and self.method != "full":
            raise ConfigError("train.optimizer=galore projects the gradients of whole weight matrices, which "
                              "train.method=lora does not train; set train.method=full.")
        if self.galore.rank < 1 or self.galore.update_proj_gap < 1:
            raise ConfigError("train.galore.rank and train.galore.update_proj_gap must be at least 1.")
        if self.teacher_placement not in TEACHER_PLACEMENTS:
            raise ConfigError(f"train.teacher_placement={self.teacher_placement!r} is not one of "
                              f"{', '.join(TEACHER_PLACEMENTS)}.")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r}; use constant, linear or cosine.")
        if not 0 <= self.onpolicy_fraction <= 1:
            raise ConfigError(f"train.onpolicy_fraction={self.onpolicy_fraction} must be a share in [0, 1].")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"train.max_rows={self.max_rows} must be a number of rows (at least 1) or null for all.")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens={self.loss_chunk_tokens} must be 0 (full logits) or a number "
                              "of positions.")
        if self.cache_shard_mb < 0:
            raise ConfigError(f"train.cache_shard_mb={self.cache_shard_mb} must be 0 (off) or a size in MiB.")
        if not self.report_poll_s > 0:
            raise ConfigError(f"train.report_poll_s={self.report_poll_s} must be a positive number of seconds.")
        for name in ("num_workers", "epochs", "micro_batch_size", "gradient_accumulation_steps", "max_seq_len",
                     "checkpoint_every", "report_every", "keep_checkpoints", "sequence_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1.")
        if self.num_workers % self.sequence_parallel_size:
            raise ConfigError(f"train.sequence_parallel_size={self.sequence_parallel_size} must divide "
                              f"train.num_workers={self.num_workers} (each group of that many workers splits "
                              "one sequence).")


OBJECTIVES = ("distill", "dpo", "kto")
# the terms a distill loss sums (loss.weights): the top-k KD on the labels, and those that need the teacher online
LOSS_TERMS = ("offline", "online_kd", "hidden", "attention")
ONLINE_TERMS = LOSS_TERMS[1:]


@dataclass
class LossConfig:
    # distill: KD on the labels (alpha, temperature, divergence); dpo, kto: preference optimisation on the pairs
    objective: str = "distill"
    alpha: float = 0.3
    temperature: float = 2.0
    divergence: str = "forward_kl"
    divergence_kwargs: dict[str, Any] = field(default_factory=dict)
    # dpo and kto: the strength of the pull towards the reference (the starting student)
    beta: float = 0.1
    # dpo: sigmoid | hinge | ipo | robust; robust's share of flipped pairs
    variant: str = "sigmoid"
    label_smoothing: float = 0.0
    # kto: weights of desirable (the teacher's) and undesirable (the student's) completions
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # distill: the weight of each term of the sum (LOSS_TERMS); hidden and attention match these block pairs
    # (student, teacher; None: evenly spaced) with this distance
    weights: dict[str, float] = field(default_factory=lambda: {"offline": 1.0, "online_kd": 0.0, "hidden": 0.0,
                                                               "attention": 0.0})
    layer_map: list[list[int]] | None = None
    hidden_loss: str = "mse"

    def online(self) -> list[str]:
        """The terms with a weight that need the teacher alive in the workers."""
        return [t for t in ONLINE_TERMS if self.weights.get(t, 0) > 0]

    def validate(self) -> None:
        from pipeline.losses.features import HIDDEN_LOSSES
        from pipeline.losses.kd import DIVERGENCES
        from pipeline.losses.preference import DPO_VARIANTS

        unknown = sorted(set(self.weights) - set(LOSS_TERMS))
        if unknown:
            raise ConfigError(f"loss.weights has {unknown}; the terms are {', '.join(LOSS_TERMS)}.")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ConfigError(f"loss.weights={self.weights} must be at least 0 each and above 0 for one term.")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ConfigError(f"loss.hidden_loss={self.hidden_loss!r} is not one of {', '.join(HIDDEN_LOSSES)}.")
        if self.layer_map is not None and any(len(pair) != 2 for pair in self.layer_map):
            raise ConfigError(f"loss.layer_map={self.layer_map} must be a list of [student block, teacher block] "
                              "pairs (0-based), or null for evenly spaced.")
        if self.objective == "distill" and not self.online() and self.weights.get("offline", 1.0) != 1.0:
            raise ConfigError(f"loss.weights.offline={self.weights['offline']} weighs the offline term against online "
                              "ones, and no online term has a weight (alone it would only scale the learning rate); "
                              "leave it at 1 or give online_kd, hidden or attention a weight.")
        if self.objective != "distill" and (self.online() or self.weights.get("offline", 1.0) != 1.0):
            raise ConfigError(f"loss.weights sums distillation terms; loss.objective={self.objective} trains on pairs "
                              "with its own loss: leave loss.weights at its default.")

        if self.objective not in OBJECTIVES:
            raise ConfigError(f"loss.objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}.")
        if self.objective != "distill":
            if self.beta <= 0:
                raise ConfigError(f"loss.beta={self.beta} must be positive.")
            if self.variant not in DPO_VARIANTS:
                raise ConfigError(f"loss.variant={self.variant!r} is not one of {', '.join(DPO_VARIANTS)}.")
            if not 0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 0.5).")
            if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
                raise ConfigError("loss.desirable_weight and loss.undesirable_weight must be positive.")

        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"loss.divergence={self.divergence!r} is not one of {sorted(DIVERGENCES)}.")
        import inspect

        takes = list(inspect.signature(DIVERGENCES[self.divergence]).parameters)[3:]  # after teacher, student, mask
        unknown = sorted(set(self.divergence_kwargs) - set(takes))
        if unknown:
            raise ConfigError(f"loss.divergence_kwargs has {unknown}, which {self.divergence} does not take (it "
                              f"takes {takes or 'none'}); remove them.")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"loss.alpha={self.alpha} must be in [0, 1].")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature={self.temperature} must be positive.")


@dataclass
class TrainStage:
    """Everything the train stage reads, resolved and typed (deepspeed stays a plain dict: it is
    DeepSpeed's own JSON config, completed with batch sizes and precision from `train`)."""

    paths: PathsConfig
    cluster: ClusterConfig
    student: ModelConfig
    train: TrainConfig
    loss: LossConfig
    deepspeed: dict[str, Any]
    # labeled rows held out by a hash of their id (pipeline/data/split.py), shared with the quantize gate
    heldout_fraction: float = 0.05
    # the teacher, for the loss terms that need it online in the workers (LossConfig.online)
    teacher: ModelConfig | None = None


@dataclass
class GoalsConfig:
    """The evaluation report's pass/fail goals (None leaves a goal out); conf/evaluate/default.yaml says each."""

    min_accuracy_vs_teacher: float | None = 0.96
    min_parameter_ratio: float | None = 4
    min_speedup: float | None = 3
    kd_beats_sft: bool = True
    max_quantized_accuracy_drop: float | None = 0.01


@dataclass
class EvalConfig:
    num_rows: int = 200
    seed: int = 1_000_003
    data_path: str | None = None
    metric: str = "last_number"
    k: int = 20
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 64
    batch_size: int = 64
    scorer_batch_size: int = 16
    latency_requests: int = 8
    concurrency: tuple[int, int] = (1, 1)
    num_cpus_per_actor: float = 1
    use_gpu: bool = True
    engine: EngineConfig = field(default_factory=EngineConfig)
    baseline_path: str | None = None
    reuse: bool = True
    goals: GoalsConfig = field(default_factory=GoalsConfig)

    def validate(self, data_seed: int, *models: ModelConfig) -> None:
        if self.metric not in ("last_number", "exact"):
            raise ConfigError(f"evaluate.metric={self.metric!r} is not a metric; use last_number or exact.")
        self.engine.validate("evaluate", *models)
        if self.data_path is None and self.seed == data_seed:
            raise ConfigError(f"evaluate.seed={self.seed} equals the training corpus seed, so the held-out rows "
                              "would be training rows; pick another evaluate.seed.")
        for name in ("num_rows", "k", "max_response_tokens", "batch_size", "scorer_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name}={getattr(self, name)} must be at least 1.")
        if self.k > self.engine.max_logprobs:
            raise ConfigError(f"evaluate.k={self.k} is larger than evaluate.engine.max_logprobs="
                              f"{self.engine.max_logprobs}; lower one or raise the other.")
        lo, hi = self.concurrency
        if not 1 <= lo <= hi:
            raise ConfigError(f"evaluate.concurrency={list(self.concurrency)} must be [min, max] with 1 <= min <= max.")
        for model in models:
            if not self.use_gpu and model.tensor_parallel_size > 1:
                raise ConfigError(f"{model.name_or_path} has tensor_parallel_size={model.tensor_parallel_size}, which "
                                  "needs GPUs, but evaluate.use_gpu=false; set evaluate.use_gpu=true.")


@dataclass
class EvaluateStage:
    """Everything the evaluate stage reads: the models come from teacher/student/paths."""

    paths: PathsConfig
    cluster: ClusterConfig
    teacher: ModelConfig
    student: ModelConfig
    data: DataConfig
    evaluate: EvalConfig
    seed: int = 0


def to_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build `cls` from a plain mapping through an OmegaConf structured config of it, which checks every value
    against the field's type (converting "2" to 2); an unknown key, a missing one or a value of the wrong type
    is one sentence naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}.")
    try:
        return _tuples(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data)))
    except OmegaConfBaseException as e:
        key = f"{where}.{e.full_key}" if getattr(e, "full_key", None) else where
        if isinstance(e, ConfigKeyError):
            owner = e.object_type if dataclasses.is_dataclass(e.object_type) else cls
            known = sorted(f.name for f in dataclasses.fields(owner))
            raise ConfigError(f"{key} is an unknown key; known keys there are {known}.") from None
        if isinstance(e, MissingMandatoryValue):
            raise ConfigError(f"{key} is missing; set it in the config or on the command line.") from None
        if isinstance(e, ValidationError):
            reason = str(e).splitlines()[0].rstrip(".")
            raise ConfigError(f"{key} has the wrong type ({reason}); fix it in the config or on the command "
                              "line.") from None
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def _tuples(obj: Any) -> Any:
    """OmegaConf keeps tuple-typed fields as lists: give the dataclasses the tuples they declare."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _tuples(value)
        elif typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
            setattr(obj, f.name, tuple(value))
    return obj


def resolve(cfg: Any) -> dict[str, Any]:
    """Resolve a Hydra/OmegaConf config once into plain containers, with a readable error on a bad value."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if not isinstance(cfg, DictConfig):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is missing; set it in the config or on the command line.") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"The config does not resolve: {str(e).splitlines()[0]}") from None


def heldout_fraction(plain: dict[str, Any]) -> float:
    """The top-level `heldout_fraction`: one split for every stage that must not see the held-out rows."""
    fraction = plain.get("heldout_fraction", 0.05)
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"heldout_fraction={fraction!r} must be a fraction in [0, 1).")
    return float(fraction)


def label_stage(cfg: Any) -> LabelStage:
    plain = resolve(cfg)
    stage = LabelStage(
        paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
        cluster=to_dataclass(ClusterConfig, plain["cluster"], "cluster"),
        teacher=to_dataclass(ModelConfig, plain["teacher"], "teacher"),
        data=to_dataclass(DataConfig, plain["data"], "data"),
        label=to_dataclass(LabelConfig, plain["label"], "label"),
    )
    stage.teacher.validate("teacher")
    stage.label.validate(stage.teacher)
    if not stage.data.paths:
        raise ConfigError("data.paths is empty; list the corpus files (jsonl or Parquet) to label.")
    return stage


def sample_stage(cfg: Any) -> SampleStage:
    plain = resolve(cfg)
    stage = SampleStage(
        paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
        cluster=to_dataclass(ClusterConfig, plain["cluster"], "cluster"),
        teacher=to_dataclass(ModelConfig, plain["teacher"], "teacher"),
        student=to_dataclass(ModelConfig, plain["student"], "student"),
        data=to_dataclass(DataConfig, plain["data"], "data"),
        label=to_dataclass(LabelConfig, plain["label"], "label"),
        sample=to_dataclass(SampleConfig, plain["sample"], "sample"),
    )
    stage.teacher.validate("teacher")
    stage.student.validate("student")
    stage.label.validate(stage.teacher)
    stage.sample.validate(stage.student, stage.teacher)
    if not stage.data.paths:
        raise ConfigError("data.paths is empty; list the corpus files (jsonl or Parquet) whose prompts to sample.")
    return stage


def pairs_stage(cfg: Any) -> PairsStage:
    plain = resolve(cfg)
    stage = PairsStage(paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
                       pairs=to_dataclass(PairsConfig, plain["pairs"], "pairs"))
    stage.pairs.validate()
    return stage


def train_stage(cfg: Any) -> TrainStage:
    plain = resolve(cfg)
    stage = TrainStage(
        paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
        cluster=to_dataclass(ClusterConfig, plain["cluster"], "cluster"),
        student=to_dataclass(ModelConfig, plain["student"], "student"),
        train=to_dataclass(TrainConfig, plain["train"], "train"),
        loss=to_dataclass(LossConfig, plain["loss"], "loss"),
        deepspeed=dict(plain["deepspeed"]),
        heldout_fraction=heldout_fraction(plain),
        teacher=to_dataclass(ModelConfig, plain["teacher"], "teacher") if plain.get("teacher") else None,
    )
    stage.student.validate("student")
    stage.train.validate(stage.student)
    stage.loss.validate()
    check_online(stage)
    if stage.loss.objective != "distill":
        t, objective = stage.train, stage.loss.objective
        if t.sequence_parallel_size > 1 or t.loss_chunk_tokens:
            raise ConfigError(f"loss.objective={objective} scores whole sequences, without sequence parallelism or "
                              "the fused LM head; set train.sequence_parallel_size=1 and train.loss_chunk_tokens=0.")
        if objective == "kto" and t.micro_batch_size < 2:
            raise ConfigError("loss.objective=kto estimates its reference point from each prompt paired with another "
                              "prompt's completion, which needs train.micro_batch_size >= 2.")
        if t.method == "full" and (stage.deepspeed.get("zero_optimization") or {}).get("stage") == 3:
            raise ConfigError(f"loss.objective={objective} with train.method=full keeps a frozen copy of the starting "
                              "student in every worker, which ZeRO-3 does not partition; use train.method=lora (the "
                              "reference is the base with the adapter switched off) or deepspeed=zero2.")
    return stage


def check_online(stage: TrainStage) -> None:
    """Refuse, before any work, what the online terms, GaLore and flash attention cannot do."""
    t, online = stage.train, stage.loss.online()
    zero = (stage.deepspeed.get("zero_optimization") or {}).get("stage", 0)
    if t.optimizer == "galore" and zero >= 1:
        raise ConfigError(f"train.optimizer=galore needs each weight's whole gradient matrix, which DeepSpeed ZeRO "
                          f"stage {zero} flattens and partitions; use deepspeed=none (no partitioning).")
    models = [("student", stage.student)] + ([("teacher", stage.teacher)] if online else [])
    if online:
        if stage.teacher is None:
            raise ConfigError(f"loss.weights gives {', '.join(online)} a weight, which needs the teacher online; "
                              "configure the teacher group.")
        stage.teacher.validate("teacher")
        if t.sequence_parallel_size > 1:
            raise ConfigError(f"loss.weights gives {', '.join(online)} a weight, which runs the teacher on whole "
                              "sequences; set train.sequence_parallel_size=1.")
        if "online_kd" in online and t.loss_chunk_tokens:
            raise ConfigError("loss.weights.online_kd compares the whole vocabulary's logits, which the fused LM head "
                              "never builds; set train.loss_chunk_tokens=0.")
    for role, model in models:
        if not model.attn_implementation.startswith("flash"):
            continue
        if not t.use_gpu:
            raise ConfigError(f"{role}.attn_implementation={model.attn_implementation} runs on CUDA GPUs only and "
                              "train.use_gpu=false trains on CPUs; use sdpa.")
        if t.sequence_parallel_size > 1 or "attention" in online:
            raise ConfigError(f"{role}.attn_implementation={model.attn_implementation} cannot run under sequence "
                              "parallelism or give the attention term its maps (sdpa wraps both); use sdpa.")


def evaluate_stage(cfg: Any) -> EvaluateStage:
    plain = resolve(cfg)
    stage = EvaluateStage(
        paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
        cluster=to_dataclass(ClusterConfig, plain["cluster"], "cluster"),
        teacher=to_dataclass(ModelConfig, plain["teacher"], "teacher"),
        student=to_dataclass(ModelConfig, plain["student"], "student"),
        data=to_dataclass(DataConfig, plain["data"], "data"),
        evaluate=to_dataclass(EvalConfig, plain["evaluate"], "evaluate"),
        seed=plain.get("seed", 0),
    )
    stage.teacher.validate("teacher")
    stage.student.validate("student")
    stage.evaluate.validate((stage.data.build or {}).get("seed", stage.seed), stage.teacher, stage.student)
    return stage
