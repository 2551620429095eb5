"""OmegaConf resolvers the config tree uses (conf/config.yaml); every entrypoint imports this module before Hydra
composes the config."""
from __future__ import annotations

import os
import tempfile

from omegaconf import OmegaConf


def local_dir(path: str) -> str:
    """`path` when it is a filesystem path; for a URI, which the stages refuse with one sentence, a folder under the
    local temp dir, so that Hydra's own files (written before any stage runs) never make a folder named `s3:` in the
    current directory."""
    return str(path) if "://" not in str(path) else os.path.join(tempfile.gettempdir(), "ray-distill-uri-root")


if not OmegaConf.has_resolver("local_dir"):
    OmegaConf.register_new_resolver("local_dir", local_dir)
