"""Serve the student behind OpenAI-compatible endpoints with Ray Serve (vLLM engine per replica).

Local:   python ray_jobs/serve.py debug=tiny paths.run_root=/tmp/run   (stays up until Ctrl-C)
Any dir: python ray_jobs/serve.py serve.model_path=/path/to/hf_model
Cluster: ray job submit --working-dir . -- python ray_jobs/serve.py experiment=qwen72b_to_7b serve.host=0.0.0.0
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipeline` from a bare --working-dir upload
import pipeline.resolvers  # noqa: E402,F401 - conf/config.yaml's ${local_dir:...}, before Hydra composes it


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.runtime import entrypoint
    from pipeline.serve.stage import run

    with entrypoint(cfg, "serve"):
        run(cfg)


if __name__ == "__main__":
    main()
    from pipeline.runtime import leave

    leave()  # without the interpreter's teardown of every module
