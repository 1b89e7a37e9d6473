"""Tiny random causal LMs saved as ordinary model directories.

For tests, the CPU demo and benchmarks: `build_tiny_model` writes a directory
that `rlatent.model.loading.load_base_model` reads exactly like a real model, so the
code under test is the code that runs on real models. The tokenizer is a
byte-level BPE trained on arithmetic word-problem lines (digits and operators
are tokens of their own, so numbers tokenise sensibly) with a chat template.

    python -m rlatent.model.tiny OUT_DIR [--architecture llama]
    python -m rlatent.model.tiny OUT_DIR --like smollm2   # SmolLM2-135M's shapes, random weights

`--like smollm2` gives a model with SmolLM2-135M's shapes (30 layers, hidden 576,
grouped-query attention 9/3, vocabulary 49,152, tied embeddings) and random
weights: what a speed or memory benchmark needs on a machine where the real
weights cannot be had (a GPU machine with no network). Its tokenizer is the tiny
one, so only the first few hundred token ids occur.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHITECTURES = {"qwen2": Qwen2Config, "llama": LlamaConfig}
# Real models' shapes, for benchmarks with random weights.
SHAPES = {
    "smollm2": dict(architecture="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                    intermediate_size=1536, vocab_size=49_152, tie_embeddings=True, max_positions=8192),
}
VOCAB_SIZE = 400
EOS, PAD = "<|endoftext|>", "<|pad|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [EOS, PAD, USER, ASSISTANT]

# User message -> "<|user|>{content}\n<|assistant|>"; assistant turns end in EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|endoftext|>\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def default_corpus() -> list[str]:
    """Arithmetic word-problem lines plus digits and operators (deterministic)."""
    names = ["Tom", "Anna", "Lee", "Maria", "Sam", "Jo"]
    things = ["apples", "books", "coins", "eggs", "pens", "cards"]
    lines = []
    for i in range(120):
        a, b = 3 + 7 * i % 97, 2 + 5 * i % 41
        name, thing = names[i % len(names)], things[i % len(things)]
        lines.append(
            f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?"
        )
        lines.append(f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.")
        lines.append(
            f"Each of the {b} boxes holds {a} {thing}, so the total cost is ${a * b} per week."
        )
        lines.append(f"{a} * {b} = {a * b}, {a} - {b} = {a - b}, {a * b} / {b} = {a}")
        lines.append(f"The answer is #### {a + b}")
    lines.append("0 1 2 3 4 5 6 7 8 9 + - * / = < > ( ) . , ? $ % #")
    return lines


def build_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (~400 tokens) trained on `corpus`, with EOS, pad and chat template."""
    tok = Tokenizer(models.BPE())
    # Digits split one by one (as Qwen2/Llama-3 do) so numbers share tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    path: str | Path,
    architecture: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    corpus: list[str] | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    tie_embeddings: bool = False,
    max_positions: int = 512,
) -> Path:
    """Save a random `architecture` model and its tokenizer to `path`; return it.

    Deterministic: the same arguments give byte-identical weights. By default the
    key/value heads are half the query heads (grouped-query attention is
    exercised), the MLP is 4x the hidden size and the vocabulary is the
    tokenizer's; `vocab_size` may only make it larger.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    path = Path(path)
    tokenizer = build_tokenizer(corpus)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size: {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    config = ARCHITECTURES[architecture](
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random causal LM directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="qwen2")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--like", choices=sorted(SHAPES), default=None,
                        help="a real model's shapes with random weights (overrides the size options)")
    args = parser.parse_args(argv)
    if args.like:
        path = build_tiny_model(args.out_dir, seed=args.seed, **SHAPES[args.like])
        print(f"random model with {args.like}'s shapes written to {path}")
        return
    path = build_tiny_model(
        args.out_dir,
        architecture=args.architecture,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seed=args.seed,
    )
    print(f"tiny {args.architecture} model written to {path}")


if __name__ == "__main__":
    main()
