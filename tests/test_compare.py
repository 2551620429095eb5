"""benchmarks/preference.py (`experiment=demo_preference`): what each arm of the comparison is given. Stages replaced
by recorders (the stages themselves run for real in tests/test_preference.py and tests/test_chain.py); the experiment
itself is a measurement, reported in the README."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import CONF, REPO

_spec = importlib.util.spec_from_file_location("compare_preference", REPO / "benchmarks" / "preference.py")
preference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preference)

KD_STEPS, ROUND_STEPS = 10, 3


def test_every_arm_gets_the_rounds_steps_from_the_same_kd_student(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline import chain

    ran: list[tuple[str, dict]] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    figures = iter(range(100))

    def record(entry: str, plain: dict) -> None:
        ran.append((entry, plain))
        p = plain["paths"]
        if entry == "train":
            out = Path(p["student_dir"])
            steps = plain["train"]["max_steps"] or (ROUND_STEPS if "onpolicy" in str(out) else KD_STEPS)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1}) + "\n" for i in range(steps)))
            (out / "lineage.json").write_text("{}")
        elif entry in ("label", "sample", "pairs"):
            d = Path(p[{"label": "labels_dir", "sample": "samples_dir", "pairs": "pairs_dir"}[entry]])
            d.mkdir(parents=True, exist_ok=True)
            (d / "manifest.json").write_text('{"summary": {}}')
        elif entry == "evaluate":
            d = Path(p["eval_dir"])
            d.mkdir(parents=True, exist_ok=True)
            n = next(figures)  # a figure per evaluation, so each arm's are told apart
            student = {"accuracy": 0.9 + n / 1000, "top1_agreement": 0.9, "kl_to_teacher": 0.1 - n / 1000}
            (d / "metrics.json").write_text(json.dumps({"models": {"student": student}}))

    monkeypatch.setattr(chain, "_entry", lambda name: lambda cfg: record(name, OmegaConf.to_container(cfg)))
    monkeypatch.setattr(preference, "_run", record)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=demo_preference", f"paths.root={tmp_path}",
                                           "compare.seeds=[3]"])
    out = preference.run(cfg)
    root, s = tmp_path / "demo_preference", tmp_path / "demo_preference" / "seeds" / "3"
    trains = {Path(c["paths"]["student_dir"]).relative_to(root).as_posix(): c for e, c in ran if e == "train"}
    assert list(trains) == ["teacher_sft/student", "seeds/3/kd", "seeds/3/onpolicy/round_1/student",
                            "seeds/3/onpolicy/round_2/student", "seeds/3/kd_more", "seeds/3/dpo", "seeds/3/sft"]
    budget = 2 * ROUND_STEPS
    kd, kd_more, dpo, sft = (trains[f"seeds/3/{a}"] for a in ("kd", "kd_more", "dpo", "sft"))
    teacher = str(root / "teacher_sft" / "student" / "model")
    assert all(c["teacher"]["name_or_path"] == teacher for k, c in trains.items() if k.startswith("seeds"))
    assert kd["train"]["seed"] == 3 and kd["train"]["epochs"] == 20 and kd["loss"]["alpha"] == 0.2
    assert kd["student"]["name_or_path"] == f"{root}/models/sort-student-seed3" and kd["student"]["build"]["seed"] == 3
    for arm in (kd_more, dpo):  # from the KD student, the rounds' steps
        assert arm["student"]["name_or_path"] == f"{s}/kd/model" and arm["student"]["build"] is None
        assert arm["train"]["max_steps"] == budget and arm["train"]["seed"] == 3
    assert kd_more["train"]["lr"] == 5.0e-4 and dpo["train"]["lr"] == 5.0e-6  # the rounds' rate; DPO's own
    assert kd_more["loss"]["divergence"] == "jsd" and kd_more["loss"]["alpha"] == 0.0
    assert kd_more["train"]["onpolicy_fraction"] == 0.0
    assert dpo["loss"]["objective"] == "dpo" and dpo["paths"]["pairs_dir"] == f"{s}/dpo_data/pairs"
    assert sft["loss"]["alpha"] == 1.0 and sft["train"]["max_steps"] == KD_STEPS + budget
    assert sft["student"] == kd["student"] and sft["train"]["lr"] == kd["train"]["lr"]  # from kd's initial weights
    samples = [c for e, c in ran if e == "sample"]
    assert [c["sample"]["n"] for c in samples] == [1, 1, 4]  # two rounds, then the DPO pairs' samples
    assert samples[-1]["paths"]["student_dir"] == f"{s}/kd"
    evaluated = [c for e, c in ran if e == "evaluate"]
    assert [Path(c["paths"]["student_dir"]).name for c in evaluated] == ["sft", "kd", "kd_more", "dpo", "student"]
    assert {c["paths"]["run_root"] for c in evaluated} == {str(root)}  # one teacher evaluation for every arm
    steps = {arm: r["steps"] for arm, r in out["results"][3].items()}
    assert steps == {"sft": KD_STEPS + budget, "kd": KD_STEPS, "kd_more": KD_STEPS + budget,
                     "dpo": KD_STEPS + budget, "onpolicy": KD_STEPS + budget}
    # evaluations in the order sft, kd, kd_more, dpo, onpolicy: accuracy rises and KL falls with each
    assert out["verdict"]["dpo"]["seeds_with_a_better_figure"] == [3]
    assert out["verdict"]["onpolicy"]["wins"] == {"accuracy": [3], "top1_agreement": [], "kl_to_teacher": [3]}
    assert "at least one figure 1/1" in (root / "compare" / "report.md").read_text()
    ran.clear()
    preference.run(cfg)  # everything done: nothing runs again
    assert [(e, c["paths"]["student_dir"]) for e, c in ran] == []
    # a changed DPO setting re-runs the DPO arm and its evaluation only, from scratch
    (s / "dpo" / "stale").write_text("")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        changed = compose("config", overrides=["experiment=demo_preference", f"paths.root={tmp_path}",
                                               "compare.seeds=[3]", "compare.dpo_loss.beta=0.2"])
    preference.run(changed)
    assert [(e, Path(c["paths"]["student_dir"]).name) for e, c in ran] == [("train", "dpo"), ("evaluate", "dpo")]
    assert not (s / "dpo" / "stale").exists()
    # samples a killed run left unfinished (their manifest without the summary) are sampled again, then paired again
    ran.clear()
    (s / "dpo_data" / "samples" / "manifest.json").write_text("{}")
    preference.run(changed)
    assert [e for e, _ in ran] == ["sample"]  # the same samples once finished: the pairs and DPO stand
