"""The whole pipeline in one command, re-running only what changed.

    [teacher_data → teacher]  label → train  [sample_r1 → train_r1 → …]  [baseline]  quantize → evaluate
    (→ serve)

With `run.teacher_sft.enabled` (the offline demo) the teacher is first trained on the corpus by the train
stage in SFT mode (α=1): `teacher_data` is the label stage in reference mode (the corpus's reference
responses, tokenized, as one-hot labels; no engine) and `teacher` trains the configured teacher on them.
With `run.onpolicy.rounds` > 0 (on-policy distillation, GKD in rounds) each round the newest student samples the
corpus and the teacher scores its samples (the sample stage), then the student trains on them mixed with the labels
(`run.onpolicy.fraction`) under `run.onpolicy.loss`; quantize, evaluate and serve take the last round's student. Each
round is two cached stages, so a killed run resumes at its round.
With `run.baseline` an SFT-only student is trained on the same rows as the KD student, for the
evaluation's KD-vs-SFT comparison. Each stage is one of the four stage entrypoints run on a derived config.

Each stage's fingerprint hashes its own config groups (as the stage sees them) and the fingerprints of the
stages it reads from, so a change re-runs that stage and everything downstream, and nothing upstream.
`<run_root>/chain.json` records the fingerprint of each stage's last successful run and
`<run_root>/stage_seconds.json` its wall seconds (printed at the end, so a time budget can be read per stage);
a stage whose
fingerprint and outputs are unchanged is skipped. A stage that re-runs because something changed starts
clean (its old outputs and checkpoints are removed first, and a bundled corpus is regenerated); one that
failed midway with an unchanged
fingerprint resumes.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import resolve, train_settings_in_use
from pipeline.data.schema import write_json_atomic


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # label | sample | train | quantize | evaluate
    groups: tuple[str, ...]  # config groups this stage's own work depends on
    deps: tuple[str, ...]  # stages whose outputs it reads
    done: tuple[str, str]  # (a path key, a file in that folder, after `derive`): it exists once the stage succeeded
    outputs: tuple[str, ...]  # path keys removed before a changed re-run
    derive: Callable[[dict[str, Any]], dict[str, Any]] = lambda plain: plain


def _sub(plain: dict[str, Any], **updates: Any) -> dict[str, Any]:
    """A copy of the resolved config with dotted keys replaced."""
    out = json.loads(json.dumps(plain))
    for dotted, value in updates.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return out


def _sft_only(plain) -> dict[str, Any]:
    """The loss of the teacher's SFT and the SFT-only baseline: the labels' CE alone, whatever online terms the
    students' loss weighs (set only where the loss has weights, so a run without them keeps its fingerprints)."""
    sft = {"loss.alpha": 1.0}
    if (plain.get("loss") or {}).get("weights"):
        sft["loss.weights"] = {"offline": 1.0, "online_kd": 0.0, "hidden": 0.0, "attention": 0.0}
    return sft


def _sft_dir(plain: dict[str, Any]) -> Path:
    return Path(plain["paths"]["run_root"]) / "teacher_sft"


def _teacher_data(plain):
    d = _sft_dir(plain)
    return _sub(plain, **{"label.mode": "reference", "paths.labels_dir": str(d / "labels"),
                          "paths.rejected_dir": str(d / "rejected")})


def _teacher(plain):
    d, sft = _sft_dir(plain), plain["run"]["teacher_sft"]
    out = _sub(_teacher_data(plain), student=plain["teacher"], **{
        **_sft_only(plain), "paths.student_dir": str(d / "student"), "paths.train_storage": str(d / "train"),
        "train.method": "full"})
    for key, value in sft["train"].items():
        out["train"][key] = value
    return out


def _trained_teacher(plain):
    if not plain["run"]["teacher_sft"]["enabled"]:
        return plain
    return _sub(plain, **{"teacher.name_or_path": str(_sft_dir(plain) / "student" / "model"), "teacher.build": None})


def _baseline(plain):
    root = Path(plain["paths"]["run_root"])
    source = _teacher_data(plain) if plain["run"]["teacher_sft"]["enabled"] else plain
    return _sub(plain, **{**_sft_only(plain), "paths.labels_dir": source["paths"]["labels_dir"],
                          "paths.student_dir": str(root / "baseline"),
                          "paths.train_storage": str(root / "baseline_train")})


def _round_dir(plain, r: int) -> Path:
    return Path(plain["paths"]["run_root"]) / "onpolicy" / f"round_{r}"


def _rounds(plain) -> int:
    return int((plain["run"].get("onpolicy") or {}).get("rounds") or 0)


def _sample_round(plain, r: int):
    """Round r's sampling: the newest student (the KD student in round 1) samples the corpus, the teacher scores."""
    previous = plain if r == 1 else _train_round(plain, r - 1)
    return _sub(_trained_teacher(plain), **{"paths.student_dir": previous["paths"]["student_dir"],
                                            "paths.samples_dir": str(_round_dir(plain, r) / "samples"),
                                            "sample.model": "trained"})


def _train_round(plain, r: int):
    """Round r's training: the newest student, as full weights (a LoRA adapter as the sample stage merged it), trained
    on its own samples mixed with the labels (run.onpolicy.fraction) under run.onpolicy's loss and train settings."""
    previous = plain if r == 1 else _train_round(plain, r - 1)
    d, onpolicy = _round_dir(plain, r), plain["run"]["onpolicy"]
    merged = previous["train"]["method"] == "full" or previous["train"]["merge"]
    base = Path(previous["paths"]["student_dir"]) / "model" if merged else d / "samples" / "student"
    out = _sub(_trained_teacher(plain), **{
        "student.name_or_path": str(base), "student.revision": None, "student.build": None,
        "paths.samples_dir": str(d / "samples"), "paths.student_dir": str(d / "student"),
        "paths.train_storage": str(d / "train"), "train.onpolicy_fraction": onpolicy["fraction"]})
    for group in ("loss", "train"):
        for key, value in onpolicy[group].items():
            out[group][key] = value
    return out


def _final_student(plain):
    """The config whose paths.student_dir is the newest student: the last on-policy round's, or the train stage's."""
    rounds = _rounds(plain)
    plain = _trained_teacher(plain)
    if rounds:
        plain = _sub(plain, **{"paths.student_dir": _train_round(plain, rounds)["paths"]["student_dir"]})
    return plain


def _evaluate(plain):
    plain = _final_student(plain)
    if plain["run"]["baseline"]:
        plain = _sub(plain, **{"evaluate.baseline_path": str(Path(plain["paths"]["run_root"]) / "baseline")})
    return plain


# what a train stage's work depends on (heldout_fraction: the rows it must not train on)
_TRAIN = ("student", "train", "loss", "deepspeed", "heldout_fraction")


def stages(plain: dict[str, Any]) -> list[Stage]:
    run = plain["run"]
    sft = run["teacher_sft"]["enabled"]
    chain = []
    if sft:
        chain += [
            Stage("teacher_data", "label", ("teacher", "data", "label", "seed"), (), ("labels_dir", "manifest.json"),
                  ("labels_dir", "rejected_dir", "data_dir"), _teacher_data),
            Stage("teacher", "train", _TRAIN, ("teacher_data",), ("student_dir", "lineage.json"),
                  ("student_dir", "train_storage"), _teacher),
        ]
    chain += [
        Stage("label", "label", ("teacher", "data", "label", "seed"), ("teacher",) if sft else (),
              ("labels_dir", "manifest.json"), ("labels_dir", "rejected_dir") + (() if sft else ("data_dir",)),
              _trained_teacher),
        Stage("train", "train", _TRAIN, ("label",), ("student_dir", "lineage.json"), ("student_dir", "train_storage"),
              _trained_teacher),
    ]
    newest = "train"
    for r in range(1, _rounds(plain) + 1):  # on-policy distillation: sample, then train on the samples, each round
        chain += [
            Stage(f"sample_r{r}", "sample", ("sample", "teacher", "label", "data", "seed"), (newest, "label"),
                  ("samples_dir", "manifest.json"), ("samples_dir",), lambda p, r=r: _sample_round(p, r)),
            Stage(f"train_r{r}", "train", _TRAIN, (f"sample_r{r}", "label"), ("student_dir", "lineage.json"),
                  ("student_dir", "train_storage"), lambda p, r=r: _train_round(p, r)),
        ]
        newest = f"train_r{r}"
    if run["baseline"]:
        chain.append(Stage("baseline", "train", _TRAIN, ("teacher_data",) if sft else ("label",),
                           ("student_dir", "lineage.json"), ("student_dir", "train_storage"), _baseline))
    chain += [
        Stage("quantize", "quantize", ("quantize", "heldout_fraction"), (newest,), ("quantized_dir", "manifest.json"),
              ("quantized_dir",), _final_student),
        Stage("evaluate", "evaluate", ("evaluate", "teacher", "student"),
              ("label", newest, "quantize") + (("baseline",) if run["baseline"] else ()), ("eval_dir", "metrics.json"),
              ("eval_dir",), _evaluate),
    ]
    return [s for s in chain if s.name not in (run.get("skip") or [])]


def check_objective(plain: dict[str, Any]) -> None:
    """The chain distils (KD, and on-policy rounds); DPO and KTO train on pairs, which it does not make."""
    objective = (plain.get("loss") or {}).get("objective", "distill")
    if objective != "distill":
        from pipeline.errors import ConfigError

        raise ConfigError(f"loss.objective={objective} trains on preference pairs, which ray_jobs/run.py does not "
                          "make; run the chain with a distillation loss, then ray_jobs/sample.py, ray_jobs/pairs.py and "
                          f"ray_jobs/train.py loss={objective} on its run root.")


def fingerprints(plain: dict[str, Any], chain: list[Stage]) -> dict[str, str]:
    """Stage name → sha256 of its own config groups (as derived for it) and its inputs' fingerprints."""
    out: dict[str, str] = {}
    for stage in chain:
        derived = storage.portable(stage.derive(plain))  # the same on every node, whatever its mirror's folder
        own = {group: derived.get(group) for group in stage.groups}
        if stage.entry == "label" and not derived["data"].get("build"):
            # a corpus of the user's own: its content, not only its paths (a bundled one follows data.build)
            from pipeline.generation.reader import corpus_identity

            own["corpus"] = corpus_identity(derived["data"]["paths"])
        # train.overwrite says what to do with another config's checkpoints, not what train makes; left out, the
        # train fingerprint is what it was before the key existed (label.overwrite stays in, as it always was)
        if isinstance(own.get("train"), dict):
            own["train"] = {k: v for k, v in train_settings_in_use(own["train"]).items() if k != "overwrite"}
        _leave_out_new_defaults(own, stage.entry)
        upstream = [out[d] for d in stage.deps if d in out]
        out[stage.name] = hashlib.sha256(json.dumps([own, upstream], sort_keys=True, default=str).encode()).hexdigest()
    return out


# keys added after run roots existed, at the value every run had before them: left out of a fingerprint while they hold
# it, so a run root made earlier is still seen done (`attn_implementation` only matters where a model trains)
_NEW_DEFAULTS = {"teacher": {"attn_implementation": "sdpa"}, "student": {"attn_implementation": "sdpa"},
                 "train": {"optimizer": "adamw", "teacher_placement": "device"}}


def _leave_out_new_defaults(own: dict[str, Any], entry: str) -> None:
    for group, defaults in _NEW_DEFAULTS.items():
        settings = own.get(group)
        if not isinstance(settings, dict):
            continue
        own[group] = {k: v for k, v in settings.items() if not (k in defaults and (
            v == defaults[k] or (k == "attn_implementation" and entry != "train")))}


# the module whose `run` each entry is (the sample stage is the label stage with the student writing the responses)
_ENTRIES = {"sample": "pipeline.label.sample"}


def _entry(name: str) -> Callable[[Any], Any]:
    import importlib

    return importlib.import_module(_ENTRIES.get(name, f"pipeline.{name}.stage")).run


def run(cfg: Any) -> dict[str, str]:
    """Run the chain; returns stage name → "ran" or "skipped"."""
    from omegaconf import OmegaConf

    plain = resolve(cfg)
    plain.pop("hydra", None)
    check_objective(plain)
    # ray_jobs/plan.py's check before the first stage: every stage's config is consistent and its minimum fits the
    # cluster described in config (or this machine), so a run never stops at stage four for want of a GPU
    plan_of(plain, with_serve=plain["run"]["serve"])
    _check_room(plain)
    if plain["run"]["serve"]:
        _serve_front_door(plain)
    root = Path(plain["paths"]["run_root"])
    chain = stages(plain)
    prints = fingerprints(plain, chain)
    record_path = root / "chain.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    seconds_path = root / "stage_seconds.json"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}
    outcome = {}
    started = time.perf_counter()
    for stage in chain:
        fp, derived = prints[stage.name], stage.derive(plain)
        key, mark = stage.done
        if record.get(stage.name) == fp and (Path(derived["paths"][key]) / mark).exists():
            print(f"run: {stage.name} skipped (config and inputs unchanged since its last successful run)", flush=True)
            outcome[stage.name] = "skipped"
            continue
        if stage.name in record and record[stage.name] != fp:
            for key in stage.outputs:
                if key != "data_dir" or derived["data"].get("build"):  # only a corpus the pipeline built
                    storage.remove(derived["paths"][key])
            print(f"run: {stage.name} re-runs from scratch (its config or an upstream stage changed)", flush=True)
        else:
            print(f"run: {stage.name} runs", flush=True)
        record.pop(stage.name, None)
        write_json_atomic(record_path, record)
        begin = time.perf_counter()
        _entry(stage.entry)(OmegaConf.create(derived))
        storage.push(root)  # at a URI run root, what the next stage's workers read is there before it starts,
        storage.pull(root)  # and what workers on other nodes sent is here for the next stage's driver
        seconds[stage.name] = round(time.perf_counter() - begin, 1)
        record[stage.name] = fp
        write_json_atomic(record_path, record)
        write_json_atomic(seconds_path, seconds)
        print(f"run: {stage.name} took {seconds[stage.name]:.1f} s", flush=True)
        outcome[stage.name] = "ran"
    ran = {name: seconds[name] for name, how in outcome.items() if how == "ran" and name in seconds}
    if ran:
        print("run: wall seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in ran.items())
              + f"; chain {time.perf_counter() - started:.1f}", flush=True)
    if plain["run"]["serve"]:
        _entry("serve")(OmegaConf.create(_final_student(plain)))
    return outcome


def _check_room(plain: dict[str, Any]) -> None:
    """On an embedded Ray, every label and sample stage's actor pools leave Ray Data's reading tasks a CPU (checked
    before the first stage, not when a round's sampling starts)."""
    from pipeline.config import label_stage, sample_stage
    from pipeline.label import sample, stage as label

    for s in stages(plain):
        if s.entry in ("label", "sample"):
            config = s.derive(plain)
            if s.entry == "label":
                label.check_room(label_stage(config))
            else:
                sample.check_room(sample_stage(config))


def _serve_front_door(plain: dict[str, Any]) -> None:
    """The serve stage's front door (serve.ingress) is read by an embedded Ray's processes when they start, and the
    chain's first stage starts that Ray: choose it before then, as ray_jobs/serve.py does before its own."""
    from pipeline.config import ClusterConfig
    from pipeline.runtime import is_embedded
    from pipeline.serve.stage import use_ingress

    if is_embedded(ClusterConfig(**plain["cluster"])):
        use_ingress(plain["serve"]["ingress"])


def plan_of(plain: dict[str, Any], with_serve: bool = True) -> dict[str, Any]:
    """The plan (`pipeline.plan`) of this chain's stages, each with its derived config, and of serving."""
    from pipeline.plan import make_plan

    configs = [(s.name, s.entry, s.derive(plain)) for s in stages(plain)]
    if with_serve:
        configs.append(("serve", "serve", _final_student(plain)))
    return make_plan(plain, configs)


def plan(cfg: Any) -> dict[str, Any]:
    """`ray_jobs/plan.py`: the chain's (and serving's) asks, fit and estimates, printed as text or JSON, or the one
    sentence that refuses them."""
    from pipeline.plan import show

    plain = resolve(cfg)
    plain.pop("hydra", None)
    result = plan_of(plain)
    show(result, plain["plan"]["format"])
    return result
