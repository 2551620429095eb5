"""Preference and on-policy distillation against offline KD on the bundled sorting task, over several student seeds.

    python benchmarks/preference.py experiment=demo_preference [compare.seeds=[0,1]] [paths.root=/data/runs]

The teacher, its labels and the corpus are the offline demo's (the chain's first stages, made once under the run
root). For each seed in `compare.seeds` (the students' initial weights, `student.build.seed`, and their row order,
`train.seed`) under `<run_root>/seeds/<seed>/`:

    kd          the KD student: the demo's loss for `compare.kd_epochs` passes over the transfer set
    onpolicy    from kd, `run.onpolicy.rounds` rounds (the chain's sample_r<i> → train_r<i> stages); the steps
                they take are the budget B every other arm gets on top of kd
    kd_more     from kd, B more steps on the teacher's labels alone, with the rounds' loss and settings
    dpo         from kd, B steps of DPO (`compare.dpo_loss`, at `compare.dpo_lr`) on pairs: the teacher-scored reference
                (chosen) against the kd student's lowest-scored of `compare.dpo_samples` samples (rejected), on the
                transfer set's prompts; kd is the frozen reference
    sft         the reference answers alone (α = 1), kd's steps plus B, from the same initial weights

Every arm is evaluated by the evaluate stage on the same fresh held-out questions (the teacher's evaluation
is made once and reused): accuracy, top-1 agreement with the teacher and KL to the teacher on its greedy answers.
`<run_root>/compare/report.md` and `results.json` hold the per-seed figures and, for DPO and on-policy KD,
the seeds in which each figure beats offline KD (kd_more, the same steps). Re-running continues where it stopped
and re-runs what a changed setting touches (`Arms`; a changed teacher or labels start every seed over).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipeline` from a bare --working-dir upload
import pipeline.resolvers  # noqa: E402,F401 - conf/config.yaml's ${local_dir:...}, before Hydra composes it

ARMS = ("sft", "kd", "kd_more", "dpo", "onpolicy")
NAMES = {"sft": "SFT-only", "kd": "KD (before the extra steps)", "kd_more": "offline KD", "dpo": "KD → DPO",
         "onpolicy": "on-policy KD"}
# figure → True where higher is better
FIGURES = {"accuracy": True, "top1_agreement": True, "kl_to_teacher": False}


def _steps(student_dir: Path) -> int:
    """The optimizer steps a finished train stage took (its metrics.jsonl's last step)."""
    lines = (student_dir / "metrics.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1])["step"])


# the module whose `run` each stage is, the path keys of its outputs (removed before a changed arm re-runs) and the
# file in the first of them that exists once it finished
STAGES = {"train": ("pipeline.train.stage", ("student_dir", "train_storage"), "lineage.json"),
          "sample": ("pipeline.label.sample", ("samples_dir",), "manifest.json"),
          "pairs": ("pipeline.preference.pairs", ("pairs_dir",), "manifest.json"),
          "evaluate": ("pipeline.evaluate.stage", ("eval_dir",), "metrics.json")}


def _run(stage: str, plain: dict[str, Any]) -> None:
    import importlib

    importlib.import_module(STAGES[stage][0]).run(OmegaConf.create(plain))


def _finished(stage: str, plain: dict[str, Any]) -> bool:
    mark = Path(plain["paths"][STAGES[stage][1][0]]) / STAGES[stage][2]
    if stage == "sample":  # its manifest is written first and again, with the summary, once every prompt is sampled
        return mark.exists() and "summary" in json.loads(mark.read_text())
    return mark.exists()


class Arms:
    """`<seed>/compare.json`: each arm's fingerprint (its derived config and its inputs' fingerprints) at its last
    finished run, as the chain keeps `chain.json`: an unchanged, finished arm is kept; a changed one starts over (its
    outputs removed first); one that stopped midway runs again, and the stage resumes what it had done."""

    def __init__(self, path: Path):
        self.path = path
        self.prints = json.loads(path.read_text()) if path.exists() else {}

    def once(self, name: str, stage: str, plain: dict[str, Any], upstream: list[str]) -> str:
        from pipeline import storage
        from pipeline.data.schema import write_json_atomic

        own = {k: v for k, v in plain.items() if k != "compare"}  # what `compare` sets is in the groups it set
        fp = hashlib.sha256(json.dumps([storage.portable(own), upstream], sort_keys=True,
                                       default=str).encode()).hexdigest()
        if self.prints.get(name) == fp and _finished(stage, plain):
            print(f"compare: {name} kept (config and inputs unchanged)", flush=True)
            return fp
        if name in self.prints:
            for key in STAGES[stage][1]:
                storage.remove(plain["paths"][key])
            print(f"compare: {name} starts over (its config or an input changed)", flush=True)
        self.prints.pop(name, None)
        write_json_atomic(self.path, self.prints)
        _run(stage, plain)
        self.prints[name] = fp
        write_json_atomic(self.path, self.prints)
        return fp


def seed_run(plain: dict[str, Any], root: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Train and evaluate every arm for one student seed; arm → the evaluate stage's figures for it."""
    from pipeline.chain import _baseline, _round_dir, _sub, _trained_teacher
    from pipeline.chain import run as run_chain

    c, s = plain["compare"], root / "seeds" / str(seed)
    onpolicy, student = plain["run"]["onpolicy"], plain["student"]
    # the seed's own initial weights (a built student: its build seed) and row order (train.seed)
    weights = {} if not student.get("build") else {
        "student.name_or_path": f"{plain['paths']['models_dir']}/{Path(student['name_or_path']).name}-seed{seed}",
        "student.build.seed": seed}
    base = _sub(_trained_teacher(plain), **{
        "paths.run_root": str(s), "paths.student_dir": str(s / "kd"), "paths.train_storage": str(s / "kd_train"),
        "paths.samples_dir": str(s / "samples"), "paths.pairs_dir": str(s / "pairs"),
        "paths.quantized_dir": str(s / "quantized"), "paths.eval_dir": str(s / "eval"),
        "train.seed": seed, "train.epochs": c["kd_epochs"], "run.teacher_sft.enabled": False,
        "run.baseline": False, "run.skip": ["label", "quantize", "evaluate"], **weights})
    print(f"compare: seed {seed}: the KD student and {onpolicy['rounds']} on-policy rounds", flush=True)
    run_chain(OmegaConf.create(base))  # kd → sample_r1 → train_r1 → …, cached in <seed>/chain.json
    made = json.loads((s / "chain.json").read_text())
    last = f"train_r{onpolicy['rounds']}"
    rounds = [_round_dir(base, r) / "student" for r in range(1, onpolicy["rounds"] + 1)]
    budget, kd_steps = sum(_steps(d) for d in rounds), _steps(s / "kd")
    print(f"compare: seed {seed}: the KD student took {kd_steps} steps, the rounds {budget}: every arm gets "
          f"{budget} more", flush=True)
    arms = Arms(s / "compare.json")

    def continued(name: str, **updates: Any) -> dict[str, Any]:  # from the KD student, `budget` steps
        out = _sub(base, **{"student.name_or_path": str(s / "kd" / "model"), "student.revision": None,
                            "student.build": None, "paths.student_dir": str(s / name),
                            "paths.train_storage": str(s / f"{name}_train")})
        for key, value in onpolicy["train"].items():  # the rounds' settings (rate, …)
            out["train"][key] = value
        return _sub(out, **{"train.max_steps": budget, "train.epochs": 10_000, **updates})  # max_steps ends it

    kd_more = continued("kd_more")
    kd_more["loss"].update(onpolicy["loss"])
    fps = {"kd": made["train"], "onpolicy": made[last],
           "kd_more": arms.once("kd_more", "train", kd_more, [made["train"]])}

    dpo_dir = s / "dpo_data"
    sampled = _sub(base, **{"paths.samples_dir": str(dpo_dir / "samples"), "sample.n": c["dpo_samples"]})
    samples = arms.once("dpo_samples", "sample", sampled, [made["train"]])
    paired = _sub(sampled, **{"paths.pairs_dir": str(dpo_dir / "pairs")})
    pairs = arms.once("dpo_pairs", "pairs", paired, [samples])
    dpo = continued("dpo", **{"paths.pairs_dir": str(dpo_dir / "pairs"), "train.lr": c["dpo_lr"]})
    dpo["loss"].update(c["dpo_loss"])
    fps["dpo"] = arms.once("dpo", "train", dpo, [made["train"], pairs])

    sft = _sub(_baseline(base), **{"paths.student_dir": str(s / "sft"), "paths.train_storage": str(s / "sft_train"),
                                   "train.max_steps": kd_steps + budget, "train.epochs": 10_000})
    fps["sft"] = arms.once("sft", "train", sft, [])

    # optimizer steps in all, from the initial weights
    steps = {"sft": _steps(s / "sft"), "kd": kd_steps, "kd_more": kd_steps + _steps(s / "kd_more"),
             "dpo": kd_steps + _steps(s / "dpo"), "onpolicy": kd_steps + budget}
    students = {"sft": s / "sft", "kd": s / "kd", "kd_more": s / "kd_more", "dpo": s / "dpo", "onpolicy": rounds[-1]}
    out = {}
    for arm, folder in students.items():
        # the run root is the experiment's, so every seed and arm reuses the one evaluation of the teacher
        evaluated = _sub(base, **{"paths.run_root": str(root), "paths.student_dir": str(folder),
                                  "paths.eval_dir": str(s / "eval" / arm), "evaluate.baseline_path": None})
        arms.once(f"eval_{arm}", "evaluate", evaluated, [fps[arm]])
        figures = json.loads((s / "eval" / arm / "metrics.json").read_text())["models"]["student"]
        out[arm] = {k: figures[k] for k in FIGURES} | {"steps": steps[arm]}
    return out


def compare(results: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """For DPO and on-policy KD: per figure, the seeds in which it beats offline KD (kd_more); and in how many seeds
    at least one figure does."""
    out = {}
    for arm in ("dpo", "onpolicy"):
        wins = {f: [seed for seed, r in results.items()
                    if (r[arm][f] > r["kd_more"][f] if higher else r[arm][f] < r["kd_more"][f])]
                for f, higher in FIGURES.items()}
        any_figure = sorted({seed for seeds in wins.values() for seed in seeds})
        out[arm] = {"wins": wins, "seeds_with_a_better_figure": any_figure}
    return out


def report(results: dict[int, dict[str, dict[str, Any]]], verdict: dict[str, Any], rows: int) -> str:
    lines = [f"Held-out questions: {rows}. Figures per seed (accuracy, top-1 agreement with the teacher, KL to the "
             "teacher in nats per token on its greedy answers; steps = optimizer steps in all).", "",
             "| seed | arm | steps | accuracy | agreement | KL |", "|---|---|---|---|---|---|"]
    for seed, r in results.items():
        for arm in ARMS:
            x = r[arm]
            lines.append(f"| {seed} | {NAMES[arm]} | {x['steps']} | {x['accuracy']:.4f} | {x['top1_agreement']:.4f} | "
                         f"{x['kl_to_teacher']:.4f} |")
    lines += ["", "| arm | accuracy (mean, min-max) | agreement | KL |", "|---|---|---|---|"]
    for arm in ARMS:
        cells = []
        for f in FIGURES:
            v = [r[arm][f] for r in results.values()]
            cells.append(f"{statistics.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})")
        lines.append(f"| {NAMES[arm]} | " + " | ".join(cells) + " |")
    n = len(results)
    lines += ["", "Against offline KD (the same steps from the same KD student), seeds in which the arm is better:", ""]
    for arm, v in verdict.items():
        per = ", ".join(f"{f} {len(seeds)}/{n}" for f, seeds in v["wins"].items())
        lines.append(f"- {NAMES[arm]}: {per}; at least one figure {len(v['seeds_with_a_better_figure'])}/{n}")
    return "\n".join(lines) + "\n"


def run(cfg: Any) -> dict[str, Any]:
    """The teacher and its labels once, every arm for every seed, then the report; returns results and verdict."""
    from pipeline.chain import _sub
    from pipeline.chain import run as run_chain
    from pipeline.config import resolve
    from pipeline.data.schema import write_json_atomic
    from pipeline.errors import ConfigError

    plain = resolve(cfg)
    plain.pop("hydra", None)
    if "compare" not in plain or not plain["run"]["onpolicy"]["rounds"]:
        raise ConfigError("benchmarks/preference.py compares arms set by a `compare` block and on-policy rounds "
                          "(run.onpolicy.rounds > 0); run it with experiment=demo_preference.")
    root = Path(plain["paths"]["run_root"])
    print("compare: the teacher and its labels (the demo chain's first stages)", flush=True)
    run_chain(OmegaConf.create(_sub(plain, **{"run.onpolicy.rounds": 0, "run.baseline": False,
                                              "run.skip": ["train", "quantize", "evaluate"]})))
    labels = json.loads((root / "chain.json").read_text())  # the teacher's and its labels' fingerprints
    made = root / "compare" / "upstream.json"
    if made.exists() and json.loads(made.read_text()) != labels:
        from pipeline import storage

        print("compare: the teacher or its labels changed: every seed's students start over", flush=True)
        storage.remove(str(root / "seeds"))
    write_json_atomic(made, labels)
    results = {seed: seed_run(plain, root, seed) for seed in plain["compare"]["seeds"]}
    verdict = compare(results)
    text = report(results, verdict, plain["evaluate"]["num_rows"])
    out = root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"results": results, "verdict": verdict})
    (out / "report.md").write_text(text)
    print(f"compare: wrote {out / 'report.md'}\n{text}", flush=True)
    return {"results": results, "verdict": verdict}


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.runtime import entrypoint

    with entrypoint(cfg, "compare"):
        run(cfg)


if __name__ == "__main__":
    main()
