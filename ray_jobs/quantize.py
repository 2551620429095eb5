"""Quantize the trained student (GPTQ 4-bit by default) behind a quality gate, for vLLM to serve.

Local:   python ray_jobs/quantize.py debug=tiny paths.run_root=/tmp/run   (after label.py and train.py)
Cluster: ray job submit --working-dir . -- python ray_jobs/quantize.py experiment=qwen72b_to_7b quantize.num_gpus=1
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipeline` from a bare --working-dir upload
import pipeline.resolvers  # noqa: E402,F401 - conf/config.yaml's ${local_dir:...}, before Hydra composes it


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.quantize.stage import run
    from pipeline.runtime import entrypoint

    with entrypoint(cfg, "quantize"):
        run(cfg)


if __name__ == "__main__":
    main()
    from pipeline.runtime import leave

    leave()  # without the interpreter's teardown of every module
