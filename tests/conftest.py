"""Shared fixtures: tiny models and corpora built locally (no download), and helpers to run entrypoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def run_job(script: str, *overrides: str, timeout: int = 900, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python ray_jobs/<script> overrides...` exactly as a user would, from the repo root (`env`: variables
    to add, e.g. an offline Hugging Face cache)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / script), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny tokenizer, teacher and student exactly as conf/{teacher,student}/tiny.yaml build them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("models-run")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={root}"])
    out = {}
    for role in ("teacher", "student"):
        model = OmegaConf.to_container(cfg[role], resolve=True)
        instantiate(model["build"], out_dir=model["name_or_path"])
        out[role] = Path(model["name_or_path"])
    out["tokenizer"] = Path(model["build"]["tokenizer_dir"])
    out["run_root"] = root
    return out


@pytest.fixture(scope="session")
def hub_models(tiny_models, tmp_path_factory) -> dict:
    """The tiny teacher and student published as hub repos `ray-distill/tiny-teacher` and `ray-distill/tiny-student`
    (tag `v1`) in a Hugging Face cache, with the offline environment that loads them from it: the code path of a
    user whose models come from the hub, without a network. Overrides select them in place of the local builds."""
    from hub_cache import offline_env, publish

    cache = tmp_path_factory.mktemp("hf-cache")
    commits = {role: publish(tiny_models[role], cache, f"ray-distill/tiny-{role}", tag="v1")
               for role in ("teacher", "student")}
    overrides = [f"{role}.{key}={value}" for role in ("teacher", "student")
                 for key, value in (("name_or_path", f"ray-distill/tiny-{role}"), ("revision", "v1"),
                                    ("build", "null"))]
    return {"cache": cache, "env": offline_env(cache), "commits": commits, "overrides": overrides}
