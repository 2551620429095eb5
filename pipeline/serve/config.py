"""The serve stage's typed config: the driver resolves the Hydra tree once and hands Serve plain values.

It lives beside the stage (not in pipeline/config.py) because only this stage reads it; it reuses the
shared `to_dataclass`/`resolve` so a wrong key or value is one clear sentence before anything starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ClusterConfig, ModelConfig, PathsConfig, resolve, to_dataclass
from pipeline.errors import ConfigError


@dataclass
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0


@dataclass
class ServeEngineConfig:
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_logprobs: int = 20
    enforce_eager: bool = False
    dtype: str | None = None
    # where the model worker runs on CPU: auto (uni on CPU with one worker, Ray Serve LLM's choice on GPUs),
    # uni (inside vLLM's engine-core process, on all of the replica's CPUs) or mp (a worker process of its own)
    executor: str = "auto"
    # any other vLLM engine argument, passed through unchanged (e.g. kv_cache_memory_bytes, quantization)
    extra: dict[str, Any] = field(default_factory=dict)


EXECUTORS = ("auto", "uni", "mp")

# Ray Serve's HTTP front doors: HAProxy forwarding to each replica's own port, or the Python proxy actor
INGRESSES = ("haproxy", "proxy")


@dataclass
class ServeConfig:
    model_path: str | None = None
    model_revision: str | None = None
    model_id: str = "student"
    app_name: str = "student"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    api_key: str | None = None
    api_key_env: str = "RAY_DISTILL_API_KEY"
    num_cpus: float = 1
    num_gpus: float = 0
    accelerator_type: str | None = None
    max_ongoing_requests: int = 64
    access_log: bool = True
    ingress: str = "haproxy"
    engine_metrics: bool = True
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    engine: ServeEngineConfig = field(default_factory=ServeEngineConfig)
    blocking: bool | None = None
    ready_timeout_s: float = 600.0
    config_out: str = "serve_config.yaml"

    def validate(self) -> None:
        a = self.autoscaling
        if not 0 <= a.min_replicas <= a.max_replicas or a.max_replicas < 1:
            raise ConfigError(f"serve.autoscaling has min_replicas={a.min_replicas}, max_replicas={a.max_replicas}; "
                              "use 0 <= min_replicas <= max_replicas and max_replicas >= 1.")
        if a.initial_replicas is not None and not a.min_replicas <= a.initial_replicas <= a.max_replicas:
            raise ConfigError(f"serve.autoscaling.initial_replicas={a.initial_replicas} must lie between "
                              "min_replicas and max_replicas.")
        if a.target_ongoing_requests <= 0:
            raise ConfigError(f"serve.autoscaling.target_ongoing_requests={a.target_ongoing_requests} "
                              "must be positive.")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"serve.max_ongoing_requests={self.max_ongoing_requests} must be at least 1.")
        if self.ingress not in INGRESSES:
            raise ConfigError(f"serve.ingress={self.ingress!r} is not one of {', '.join(INGRESSES)}; use haproxy "
                              "(Ray Serve's HAProxy ingress) or proxy (its Python HTTP proxy).")
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port={self.port} is not a TCP port.")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix={self.route_prefix!r} must start with '/'.")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("serve.num_cpus and serve.num_gpus must not be negative.")
        if not self.model_id or "/" in self.app_name:
            raise ConfigError("serve.model_id must be non-empty and serve.app_name must not contain '/'.")
        if not 0 < self.engine.gpu_memory_utilization <= 1:
            raise ConfigError(f"serve.engine.gpu_memory_utilization={self.engine.gpu_memory_utilization} "
                              "must be in (0, 1].")
        if self.engine.executor not in EXECUTORS:
            raise ConfigError(f"serve.engine.executor={self.engine.executor!r} is not one of {', '.join(EXECUTORS)}.")
        if self.engine.executor != "auto" and self.num_gpus > 0:
            raise ConfigError(f"serve.engine.executor={self.engine.executor} is for CPU serving, but serve.num_gpus="
                              f"{self.num_gpus}; on GPUs Ray Serve LLM runs its own executor: set "
                              "serve.engine.executor=auto.")


@dataclass
class ServeStage:
    """Everything the serve stage reads, resolved and typed."""

    paths: PathsConfig
    cluster: ClusterConfig
    student: ModelConfig
    serve: ServeConfig


def serve_stage(cfg: Any) -> ServeStage:
    plain = resolve(cfg)
    stage = ServeStage(
        paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
        cluster=to_dataclass(ClusterConfig, plain["cluster"], "cluster"),
        student=to_dataclass(ModelConfig, plain["student"], "student"),
        serve=to_dataclass(ServeConfig, plain.get("serve") or {}, "serve"),
    )
    stage.serve.validate()
    if stage.serve.engine.executor == "uni" and stage.student.tensor_parallel_size > 1:
        raise ConfigError(f"serve.engine.executor=uni runs one model worker, but {stage.student.name_or_path} has "
                          f"tensor_parallel_size={stage.student.tensor_parallel_size}; set serve.engine.executor=mp.")
    return stage


def engine_executor(stage: ServeStage) -> str:
    """Where the replica's model worker runs: `uni` (in vLLM's engine-core process), `mp` (a worker process)
    or `default` (Ray Serve LLM's choice, its Ray executor on GPUs)."""
    choice = stage.serve.engine.executor
    if choice != "auto":
        return choice
    if stage.serve.num_gpus > 0:
        return "default"
    return "uni" if stage.student.tensor_parallel_size == 1 else "mp"
