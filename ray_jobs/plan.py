"""Print what each stage will ask the cluster for, whether it fits, and its hours, storage and cost — before any work.

Local:   python ray_jobs/plan.py experiment=qwen72b_to_7b
JSON:    python ray_jobs/plan.py experiment=qwen72b_to_7b plan.format=json
Corpus:  python ray_jobs/plan.py experiment=qwen72b_to_7b plan.corpus_rows=100000 plan.prompt_tokens=300 plan.response_tokens=700
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipeline` from a bare --working-dir upload
import pipeline.resolvers  # noqa: E402,F401 - conf/config.yaml's ${local_dir:...}, before Hydra composes it


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.chain import plan
    from pipeline.runtime import user_errors

    with user_errors():
        plan(cfg)


if __name__ == "__main__":
    main()
    from pipeline.runtime import leave

    leave()  # without the interpreter's teardown of every module
