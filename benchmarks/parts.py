"""Shared plumbing for the benchmarks: each measurement runs in its own process (engines never share
memory) and hands its result back through a JSON file, since Ray and vLLM also print to stdout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_part(script: str, name: str, root: Path, *extra: str) -> dict:
    """Run `script` again with this process's arguments plus `--part name` (and `extra`, which win over
    earlier flags); return what that part wrote under `root`."""
    proc = subprocess.run([sys.executable, script, *sys.argv[1:], *extra, "--part", name], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"benchmark part {name} failed")
    return json.loads((root / f"part-{name}.json").read_text())


def write_part(root: Path, name: str, result: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"part-{name}.json").write_text(json.dumps(result, default=str))
