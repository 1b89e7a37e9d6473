"""A/B of one phase-2 rollout round: the LM head once a step (logits shared with the soft projection) against
twice (the projection computes them again, as before commit "sampler: LM head once a step").

Both arms run in this process, alternating, on the same start, prompts and seeds, so they share the machine's
load; the trajectories of the two arms must be equal (the change is exact). Prints a table, writes JSON.

    python experiments/tools/sampler_lm_head_ab.py runs/multiop_compress/latent-s10/checkpoints/step_000120 \
        --repeats 3 --json experiments/results/sampler_lm_head_2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rlatent
from rlatent.data.examples import format_prompt, special_token_ids
from rlatent.data.splits import load_split
from rlatent.latent.sampler import SamplingSettings
from rlatent.workers.rollout import SamplerEngine, chunk_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    policy = rlatent.load(args.checkpoint)
    model, tokenizer, cfg = policy.model, policy.tokenizer, policy.cfg
    problems, _ = load_split(cfg.data, "train", limit=args.prompts)
    prompts = [format_prompt(p.question, tokenizer) for p in problems for _ in range(cfg.grpo.group_size)]
    engine = SamplerEngine(model, *special_token_ids(tokenizer), SamplingSettings.for_rollouts(cfg.latent, cfg.grpo))
    own = model.latent_inputs
    arms = {"once": own, "twice": lambda hidden, logits=None: own(hidden)}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    outputs = {}
    for repeat in range(args.repeats):
        for arm, function in arms.items():
            model.latent_inputs = function
            started = time.perf_counter()
            outputs[arm] = engine.sample(prompts, chunk_seed(cfg.seed, repeat, 0))
            seconds[arm].append(time.perf_counter() - started)
        once, twice = outputs["once"], outputs["twice"]
        if not (torch.equal(once.batch.input_ids, twice.batch.input_ids)
                and torch.equal(once.slot_inputs, twice.slot_inputs)
                and torch.equal(once.token_logprobs, twice.token_logprobs)):
            raise SystemExit(f"repeat {repeat}: the two arms sampled different trajectories")
    counts = outputs["once"].counts()
    result = {arm: {"seconds": s, "median": statistics.median(s)} for arm, s in seconds.items()}
    result.update(rows=len(prompts), forward_passes=outputs["once"].forward_passes,
                  latents_per_row=float(counts["latents"].float().mean()),
                  tokens_per_row=float(counts["tokens"].float().mean()),
                  speed_up=result["twice"]["median"] / result["once"]["median"], threads=torch.get_num_threads(),
                  checkpoint=args.checkpoint, equal_trajectories=True)
    print("| arm | median s | runs |\n|---|---|---|")
    for arm in arms:
        print(f"| LM head {arm} a step | {result[arm]['median']:.2f} | {', '.join(f'{x:.2f}' for x in seconds[arm])} |")
    print(f"speed-up {result['speed_up']:.3f}x; {len(prompts)} rows, {result['forward_passes']} passes, "
          f"{result['latents_per_row']:.1f} latents and {result['tokens_per_row']:.1f} tokens a row; trajectories equal")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
