"""Lay local model directories out as a Hugging Face hub cache, so tests take the hub code path offline.

`publish(src, cache, "ray-distill/tiny-teacher", tag="v1")` writes what `huggingface_hub` leaves after a
download: `models--ray-distill--tiny-teacher/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<tag>,
refs/main}`. With `HF_HUB_CACHE=<cache>` and `HF_HUB_OFFLINE=1`, transformers, vLLM, PEFT and
`huggingface_hub` then load `ray-distill/tiny-teacher` at revision `v1` (or the commit) exactly as they load
a real hub model that was downloaded before, and never reach the network.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def publish(src: str | Path, cache: str | Path, repo_id: str, tag: str = "main") -> str:
    """Copy the files of `src` into `cache` as one commit of the model repo `repo_id`; `refs/<tag>` and
    `refs/main` point at it. Returns the commit hash (40 hex digits, derived from the content)."""
    src, repo = Path(src), Path(cache) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for path in files:
        digest.update(str(path.relative_to(src)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    commit = digest.hexdigest()
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in {tag, "main"}:
        (repo / "refs" / ref).write_text(commit)
    return commit


def offline_env(cache: str | Path) -> dict[str, str]:
    """The environment of a machine that downloaded its models before and has no hub access now."""
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def patch_offline(monkeypatch, cache: str | Path) -> None:
    """The same, inside this (test) process: `huggingface_hub` reads its cache folder and offline switch from
    `huggingface_hub.constants` at each call, after the environment was read at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
