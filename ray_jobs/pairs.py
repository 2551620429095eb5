"""Preference pairs from the labels (chosen: the teacher) and the samples (rejected: the student) to Parquet.

Local:   python ray_jobs/pairs.py debug=tiny paths.run_root=/tmp/run
Cluster: ray job submit --working-dir . -- python ray_jobs/pairs.py experiment=qwen7b_to_0_5b pairs.per_prompt=2
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipeline` from a bare --working-dir upload
import pipeline.resolvers  # noqa: E402,F401 - conf/config.yaml's ${local_dir:...}, before Hydra composes it


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.preference.pairs import run
    from pipeline.runtime import entrypoint

    with entrypoint(cfg, "pairs"):
        run(cfg)


if __name__ == "__main__":
    main()
    from pipeline.runtime import leave

    leave()  # without the interpreter's teardown of every module
