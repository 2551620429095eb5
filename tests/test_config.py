"""Every shipped config composes, resolves into the typed stage config, and each `_target_` binds to its
callable's signature — without loading a model."""
from __future__ import annotations

import importlib
import inspect

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF
from pipeline.config import evaluate_stage, label_stage, pairs_stage, sample_stage, train_stage
from pipeline.quantize.config import quantize_stage
from pipeline.serve.config import serve_stage
from pipeline.errors import ConfigError

GROUPS = ["paths", "cluster", "teacher", "student", "data", "label", "sample", "pairs", "train", "loss", "deepspeed",
          "quantize", "serve", "evaluate"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/ray-distill-test", *overrides])


CASES = ([f"{g}={o}" for g in GROUPS for o in _options(g)] + [f"experiment={o}" for o in _options("experiment")]
         + [f"debug={o}" for o in _options("debug")])


@pytest.mark.parametrize("override", CASES)
def test_every_config_composes_and_validates(override, monkeypatch):
    monkeypatch.setenv("RAY_DISTILL_CORPUS", "/tmp/corpus.jsonl")  # conf/data/jsonl.yaml reads it
    cfg = _compose(override)
    stage = label_stage(cfg)
    assert stage.paths.labels_dir.startswith(stage.paths.run_root)
    trained = train_stage(cfg)
    sample_stage(cfg)
    pairs_stage(cfg)
    evaluate_stage(cfg)
    quantize_stage(cfg)
    serve_stage(cfg)
    assert trained.deepspeed["zero_optimization"]["stage"] in (0, 1, 2, 3)
    assert stage.label.k <= stage.label.engine.max_logprobs
    for target, kwargs in _targets(OmegaConf.to_container(cfg, resolve=True)):
        module, name = target.rsplit(".", 1)
        fn = getattr(importlib.import_module(module), name)
        bound = inspect.signature(fn).bind_partial(**kwargs)
        missing = [p.name for p in inspect.signature(fn).parameters.values()
                   if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                   and p.name not in bound.arguments]
        assert set(missing) <= {"out_dir"}, f"{target} lacks {missing}"


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"], {k: v for k, v in node.items() if k != "_target_"}
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


def test_every_yaml_field_has_a_comment():
    """STYLE rule: a one-line comment above each field (the first field of a list item excepted)."""
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
                continue
            if path.name == "config.yaml" and (line.startswith(("defaults", "hydra")) or line.startswith("  ")):
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if stripped.endswith(":") and len(nxt) - len(nxt.lstrip()) > len(line) - len(line.lstrip()):
                continue  # a mapping header: its fields carry the comments
            prev = lines[i - 1].strip() if i else ""
            nested_child = prev.endswith(":") and not prev.startswith("#")
            assert prev.startswith("#") or nested_child or _sibling_group(lines, i), \
                f"{path.relative_to(CONF)}:{i + 1} `{stripped}` has no comment above it"


def _sibling_group(lines, i):
    # consecutive fields under one comment (e.g. num_heads / num_kv_heads) share it
    j = i - 1
    indent = len(lines[i]) - len(lines[i].lstrip())
    while j >= 0 and lines[j].strip() and not lines[j].strip().startswith("#"):
        if len(lines[j]) - len(lines[j].lstrip()) != indent:
            return False
        j -= 1
    return j >= 0 and lines[j].strip().startswith("#")


@pytest.mark.parametrize("override,message", [
    (["label.k=32"], "larger than the engine allows"),
    (["label.mode=distill"], "not a mode"),
    (["label.concurrency=[3,1]"], "label.concurrency"),
    (["+label.batchsize=4"], "unknown key"),
    (["label.max_prompt_tokens=4096"], "leaves no room"),
    (["label.engine.kv_cache_memory_bytes=0"], "positive number of bytes"),
    (["label.engine.gpu_memory_utilization=0"], "must be in"),
    (["label.engine.in_process=true", "teacher.tensor_parallel_size=2"], "in_process=false"),
    (["train.method=qlora"], "not a method"),
    (["loss.divergence=kl"], "is not one of"),
    (["loss.alpha=1.5"], "must be in"),
    (["train.micro_batch_size=0"], "at least 1"),
    (["train.num_workers=two"], r"^train.num_workers has the wrong type \(Value 'two' of type 'str' could not be "
                                r"converted to Integer\); fix it in the config or on the command line.$"),
    (["label.concurrency=[1,many]"], r"^label.concurrency\[1\] has the wrong type"),
    (["+train.lora.rank=4"], r"^train.lora.rank is an unknown key; known keys there are \['alpha', 'dropout', 'r', "),
    (["paths.run_root=???"], r"^paths.run_root is missing"),
    (["paths.root=s3://bucket/prefix"], r"^paths.run_root=s3://bucket/prefix/default is a URI, which the ray_jobs "
                                        r"entrypoints open through a local mirror"),
    (["paths.labels_dir=s3://bucket/labels"], r"^paths.labels_dir=s3://bucket/labels is a URI under a local "),
    (["loss.objective=ppo"], r"^loss.objective='ppo' is not one of distill, dpo, kto"),
    (["loss=dpo", "loss.variant=exo"], r"^loss.variant='exo' is not one of sigmoid, hinge, ipo, robust"),
    (["loss=dpo", "loss.beta=0"], r"^loss.beta=0.0 must be positive"),
    (["loss=kto", "train.sequence_parallel_size=2"], r"^loss.objective=kto scores whole sequences"),
    (["loss=dpo", "train.method=full", "deepspeed=zero3"], r"ZeRO-3 does not partition; use train.method=lora"),
    (["loss=kto", "train.micro_batch_size=1"], r"needs train.micro_batch_size >= 2"),
    (["sample.model=best"], r"^sample.model='best' is not one of trained, base"),
    (["sample.sampling.temperature=0"], r"^sample.sampling.temperature=0.0 must be positive"),
    (["sample.scoring.concurrency=[2,1]"], r"^sample.scoring.concurrency=\[2, 1\] must be"),
    (["pairs.per_prompt=0"], r"^pairs.per_prompt=0 must be at least 1"),
    (["train.optimizer=galore"], r"^train.optimizer=galore projects the gradients of whole weight matrices, which "
                                 r"train.method=lora does not train; set train.method=full.$"),
    (["train.optimizer=galore", "train.method=full"], r"^train.optimizer=galore needs each weight's whole gradient "
                                                      r"matrix, which DeepSpeed ZeRO stage 2 flattens and partitions"),
    (["student.attn_implementation=flash_attention_2"],
     r"^student.attn_implementation=flash_attention_2 runs on CUDA GPUs only and train.use_gpu=false trains on CPUs; "
     r"use sdpa.$"),
    (["loss=kd_online", "teacher.attn_implementation=flash_attention_2"], r"^teacher.attn_implementation=flash_"),
    (["loss=kd_online", "train.use_gpu=true", "student.attn_implementation=flash_attention_2"],
     r"cannot run under sequence parallelism or give the attention term its maps"),
    (["student.attn_implementation=flash"], r"^student.attn_implementation='flash' is not one of sdpa, eager, "),
    (["loss=kd_hidden", "train.sequence_parallel_size=2"], r"^loss.weights gives hidden a weight, which runs the "
                                                           r"teacher on whole sequences"),
    (["loss=kd_online", "train.loss_chunk_tokens=64"], r"^loss.weights.online_kd compares the whole vocabulary"),
    (["+loss.weights.logits=1"], r"^loss.weights has \['logits'\]; the terms are offline, online_kd, hidden, "),
    (["+loss.weights.offline=0"], r"must be at least 0 each and above 0 for one term"),
    (["+loss.weights.offline=0.5"], r"^loss.weights.offline=0.5 weighs the offline term against online ones"),
    (["loss=kd_hidden", "loss.hidden_loss=l1"], r"^loss.hidden_loss='l1' is not one of mse, cosine"),
    (["loss=kd_hidden", "loss.layer_map=[[0]]"], r"^loss.layer_map=\[\[0\]\] must be a list of \[student block"),
    (["loss=dpo", "+loss.weights.hidden=1"], r"^loss.weights sums distillation terms; loss.objective=dpo"),
    (["train.teacher_placement=gpu"], r"^train.teacher_placement='gpu' is not one of device, zero3, cpu_offload"),
])
def test_wrong_config_is_one_clear_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg = _compose("debug=tiny", *override)
        label_stage(cfg)
        train_stage(cfg)
        sample_stage(cfg)
        pairs_stage(cfg)


def test_actor_pools_that_leave_no_cpu_for_reading_are_refused_before_ray_starts(tmp_path):
    """The sample stage's two pools run at once beside Ray Data's read and prepare tasks: on an embedded Ray of 2 CPUs,
    a student and a teacher actor of 1 CPU each would start and wait forever for rows (a hang once seen)."""
    import ray

    from pipeline.label.sample import run

    cfg = _compose("debug=tiny", f"paths.run_root={tmp_path}", "cluster.num_cpus=2", "sample.num_cpus_per_actor=1",
                   "sample.scoring.num_cpus_per_actor=1")
    with pytest.raises(ConfigError, match=r"take 2 of the embedded Ray's 2 CPUs and leave less than the one Ray Data's "
                                          r"reading tasks need .*; lower either pool's concurrency"):
        run(cfg)
    assert not ray.is_initialized() and not any(tmp_path.iterdir())


def test_a_student_seed_leaves_the_sft_teacher_alone():
    """train.seed varies the students; the SFT teacher (run.teacher_sft) follows the global seed, so a sweep over
    student seeds re-trains neither the teacher nor its labels."""
    from pipeline.chain import fingerprints, stages

    def prints(*overrides):
        plain = OmegaConf.to_container(_compose("experiment=demo", *overrides), resolve=True)
        return fingerprints(plain, stages(plain))

    base, student_seed, global_seed = prints(), prints("train.seed=7"), prints("seed=7")
    for stage in ("teacher_data", "teacher", "label"):
        assert student_seed[stage] == base[stage], stage
    for stage in ("train", "baseline", "quantize", "evaluate"):
        assert student_seed[stage] != base[stage], stage
    assert global_seed["teacher"] != base["teacher"]


def test_one_heldout_split_for_training_and_the_quantize_gate():
    """The quantize gate scores exactly the rows the train stage held out: one top-level fraction (the defaults used
    to be 0.05 for training and 0.1 for the gate, so the gate scored rows the student had trained on)."""
    from pipeline.config import train_stage
    from pipeline.quantize.config import quantize_stage

    for overrides in ([], ["debug=tiny"], ["experiment=demo"], ["heldout_fraction=0.2"]):
        cfg = _compose(*overrides)
        assert train_stage(cfg).heldout_fraction == quantize_stage(cfg).heldout_fraction > 0
    with pytest.raises(ConfigError, match="quantize gate would score rows the student trained on"):
        quantize_stage(_compose("heldout_fraction=0"))
    with pytest.raises(ConfigError, match=r"heldout_fraction=1\.5 must be a fraction"):
        train_stage(_compose("heldout_fraction=1.5"))


def _defaults(cls) -> dict:
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
        elif f.default is not dataclasses.MISSING:
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


@pytest.mark.parametrize("group,cls", [("label", "pipeline.config:LabelConfig"), ("train", "pipeline.config:TrainConfig"),
                                       ("sample", "pipeline.config:SampleConfig"),
                                       ("pairs", "pipeline.config:PairsConfig"),
                                       ("evaluate", "pipeline.config:EvalConfig"),
                                       ("quantize", "pipeline.quantize.config:QuantizeConfig"),
                                       ("serve", "pipeline.serve.config:ServeConfig")])
def test_each_default_has_one_value(group, cls):
    """A group's shipped YAML and its dataclass (the schema every value is checked against) agree on every default
    both state (an interpolation such as ${seed} is the YAML's own), and the YAML ships no key the schema lacks."""
    import yaml

    module, name = cls.split(":")
    schema = _defaults(getattr(importlib.import_module(module), name))
    path = CONF / group / ("gptq_w4.yaml" if group == "quantize" else "default.yaml")
    shipped = yaml.safe_load(path.read_text())
    shipped.pop("defaults", None)

    def walk(yaml_values, dataclass_values, where):
        for key, value in yaml_values.items():
            assert key in dataclass_values, f"{where}.{key} is shipped in YAML but has no field"
            default = dataclass_values[key]
            if isinstance(value, dict) and isinstance(default, dict) and key not in ("build", "divergence_kwargs"):
                walk(value, default, f"{where}.{key}")
            elif not (isinstance(value, str) and "${" in value):
                assert value == default, f"{where}.{key}: YAML says {value!r}, the dataclass {default!r}"

    walk(shipped, schema, group)


def test_a_uri_run_root_with_a_credential_is_refused_before_anything_is_written(tmp_path):
    """A run root whose URI carries a key is refused with one sentence by the entrypoint before any work, and
    nothing is written where the command ran: Hydra's own run folder, which follows the run root, would have been a
    folder named `s3:` there (pipeline/resolvers.py sends it to the temp dir)."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "label.py"), "debug=tiny",
                           "paths.root=s3://AKIAEXAMPLE:secret@bucket/prefix"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: paths.run_root carries a credential in its URI")
    assert list(tmp_path.iterdir()) == []
