"""Tiny Qwen2-architecture models and a locally trained tokenizer.

No weights can be downloaded on CI or in the offline demo, so tests and the demo build their teacher and
student here: a byte-level BPE tokenizer trained with `tokenizers` (ChatML special tokens and chat
template, like Qwen's) and a random-init `Qwen2ForCausalLM`, both saved as ordinary HF directories that
transformers, vLLM and every stage load exactly as they would load a real checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def default_tokenizer_corpus(task: str = "arithmetic") -> list[str]:
    """A few thousand lines of varied text: enough for a BPE that splits words and digits sensibly."""
    from pipeline.data.corpus import sample_texts

    return sample_texts(4000, seed=0, task=task)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, texts: Iterable[str] | None = None,
                    split_digits: bool = False):
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer directory with a ChatML template.
    `split_digits` makes every digit its own token (as Qwen's and Llama's tokenizers do), so a model sees
    numbers digit by digit instead of as arbitrary multi-digit merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts if texts is not None else default_tokenizer_corpus()), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(out_dir)
    return fast


def build_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
    initializer_range: float = 0.02,
):
    """Random-init Qwen2ForCausalLM saved with its tokenizer. `vocab_size` defaults to the tokenizer's size;
    a larger one (e.g. Qwen's 151,936) pads the embedding like real Qwen checkpoints do. A larger
    `initializer_range` gives a random model peaked next-token distributions, closer to a trained one's."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=dtype,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "ray_distill_build.json").write_text(
        json.dumps({"builder": "pipeline.models.tiny.build_model", "seed": seed,
                    "num_parameters": sum(p.numel() for p in model.parameters())}, indent=2)
    )
    return out_dir


def build_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path, tokenizer_vocab_size: int = 512,
                     tokenizer_task: str = "arithmetic", tokenizer_split_digits: bool = False,
                     **model_kwargs) -> Path:
    """What `teacher.build` / `student.build` call: the shared tokenizer (trained once, on text of the bundled
    corpus task `tokenizer_task`) and a model."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():
        build_tokenizer(tokenizer_dir, vocab_size=tokenizer_vocab_size,
                        texts=default_tokenizer_corpus(tokenizer_task), split_digits=tokenizer_split_digits)
    return build_model(out_dir, tokenizer_dir, **model_kwargs)
