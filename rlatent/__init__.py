"""rlatent: reinforcement-learning fine-tuning of language models that reason with interleaved latent thoughts.

The package's folders are its architecture, each importing only the ones below it:

    run/          the top: CLI, the stages a command runs (sft, grpo, train, eval), evaluation, Python API
    sft/          phase 1: trainer, losses and the latent-gain diagnostics
    grpo/         phase 2: the loop, the learner's update, the reference policy, the loss math
    distributed/  where phase 2 runs: local or Ray backends
    workers/      what runs there: rollout engines (rlatent's sampler, vLLM), weight sync
    latent/       batch, training forward, sampler, policy (every action's log-prob), trajectories
    model/        latent model, heads, projections, loading, tiny models
    data/         GSM8K, calculator marks and grading, examples, synthetic problems
    optim/        torch and DeepSpeed optimizers and their shared state
    io/           run directory, metrics, plots, checkpoints, atomic writes
    config/, modes.py, errors.py: the foundation; rewards live in the top-level `rewards` package.

The Python API (`load`, `build_model`, `LatentPolicy`, `Answer`) is imported on first use, so
`import rlatent.config` stays light.
"""

_API = ("load", "build_model", "LatentPolicy", "Answer")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from rlatent.run import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlatent' has no attribute {name!r}")
