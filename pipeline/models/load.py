"""Make sure a configured model exists, and fingerprint it and its tokenizer for manifests.

Real models are HF hub ids or local directories; tiny test models carry a `build` spec and are built on
first use. Fingerprints let a later stage refuse labels made with a different teacher or tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.errors import ModelError

# Local weights up to this size are hashed whole; bigger ones by file names, sizes and safetensors headers.
_FULL_HASH_LIMIT = 512 * 1024 * 1024


def ensure_model(model: ModelConfig, role: str) -> None:
    """Build a missing tiny model from its `build` spec; refuse a missing local path with one sentence."""
    path = Path(model.name_or_path)
    if (path / "config.json").exists():
        return
    if model.build:
        from hydra.utils import instantiate

        instantiate(model.build, out_dir=str(path))
        return
    if model.name_or_path.startswith(("/", ".", "~")) or path.exists():
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


def model_fingerprint(model: ModelConfig) -> dict[str, Any]:
    """Hub id + revision for hub models; a content hash for local directories."""
    path = Path(model.name_or_path)
    info: dict[str, Any] = {"name_or_path": model.name_or_path, "revision": model.revision, "dtype": model.dtype}
    if path.is_dir():
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
