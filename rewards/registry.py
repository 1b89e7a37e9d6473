"""Rewards for GRPO: find the functions a config names, score a batch, check what comes back.

A reward is a plain function (TRL's convention, with the prompts first):

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float]

called once per batch with, as lists of one entry per completion, the trajectory
facts (`TRAJECTORY_FACTS`) and the dataset's columns, plus the reward's own
config `kwargs`. The built-ins live in the top-level `rewards` package.

Every value a reward returns is checked: a reward that raises, returns the wrong
number of values, a non-number, NaN or inf either stops the run with one line
naming the reward and the sample (`grpo.reward_errors: raise`), or scores 0.0
for what it got wrong and is counted (`zero`) so the trainer logs how often.
Never a silent wrong number. A reward that calls `sys.exit()` stops the run with one line naming
it; Ctrl-C inside a reward (`KeyboardInterrupt`) is the user's, and interrupts the run.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from rlatent.config import RewardSpec
from rlatent.config.phase2 import reward_names
from rlatent.errors import ConfigError, RlatentError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rlatent.rewards"
TRAJECTORY_FACTS = ("latents", "blocks", "tokens", "forward_passes", "truncated")
"""Facts about each sampled trajectory passed to every reward (latents used, latent blocks,
answer tokens, tokens + latents, hit `max_new_tokens` without EOS)."""

RewardFn = Callable[..., Sequence[float]]


# --------------------------------------------------------------------------- resolving names


def resolve_reward(name: str, where: str | None = None) -> RewardFn:
    """The reward function `name` refers to, tried in this order:

    1. a built-in (`rewards.BUILTIN_REWARDS`: `gsm8k_correct`, `gsm8k_format`, ...);
    2. an installed entry point named `name` in group `rlatent.rewards`;
    3. a dotted path `package.module:function` (or `package.module.function`). Like
       `python -m`, the current directory is searched too: when the module is not found
       on `sys.path`, the current directory is appended to it and the import retried,
       so `examples.my_rewards:short_and_correct` works from the repository root.

    Anything else is a one-line `ConfigError` that starts with `where` (the config key,
    e.g. `grpo.rewards[1].function`) and names the reward and what was tried.
    """
    from rewards import BUILTIN_REWARDS

    prefix = f"{where}: {name!r}" if where else f"reward {name!r}"
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in entry_points:
        try:
            fn = entry_points[name].load()
        except Exception as exc:
            raise ConfigError(
                f"{prefix}: entry point ({ENTRY_POINT_GROUP}) {entry_points[name].value!r} failed to load: "
                f"{_exception_line(exc)}"
            ) from None
        return _check_callable(fn, prefix)
    if ":" in name:
        module_name, _, attr = name.partition(":")
    else:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        known = sorted(BUILTIN_REWARDS) + sorted(entry_points)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{prefix}: not a built-in ({', '.join(sorted(BUILTIN_REWARDS))}), no entry point in group "
            f"{ENTRY_POINT_GROUP!r}, and not a dotted path 'package.module:function'{hint}"
        )
    module = _import_module(module_name, prefix)
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{prefix}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    return _check_callable(fn, prefix)


def _import_module(module_name: str, prefix: str):
    for attempt in range(2):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if not (module_name == missing or module_name.startswith(missing + ".")):
                failure = _exception_line(exc)
                raise ConfigError(f"{prefix}: importing module {module_name!r} failed: {failure}") from None
            cwd = os.getcwd()
            if attempt == 0 and cwd not in sys.path and "" not in sys.path:
                sys.path.append(cwd)
                importlib.invalidate_caches()
                continue
            raise ConfigError(f"{prefix}: module {module_name!r} not found") from None
        except Exception as exc:
            raise ConfigError(f"{prefix}: importing module {module_name!r} failed: {_exception_line(exc)}") from None


def _check_callable(fn: Any, prefix: str) -> RewardFn:
    if not callable(fn):
        raise ConfigError(f"{prefix}: is a {type(fn).__name__}, not a function")
    return fn


# --------------------------------------------------------------------------- scoring


class RewardSet:
    """The weighted rewards of a run, built once from `grpo.rewards` and called every step.

    Built-time checks (so a typo fails before any sampling): every name resolves, every
    function accepts `(prompts, completions, **kwargs)`, weights are finite, config
    kwargs do not shadow a trajectory fact, and a built-in gets no keyword it does not
    take (its options are checked on an empty batch).
    """

    def __init__(self, specs: Sequence[RewardSpec], errors: Literal["raise", "zero"] = "raise"):
        if errors not in ("raise", "zero"):
            raise ConfigError(f"grpo.reward_errors: expected 'raise' or 'zero', got {errors!r}")
        if not specs:
            raise ConfigError("grpo.rewards: at least one reward is needed")
        from rewards import BUILTIN_REWARDS

        self.specs = list(specs)
        self.errors = errors
        self.fns: list[RewardFn] = []
        self.required: list[tuple[str, ...]] = []
        self.names = reward_names(self.specs)
        """Metric names, one per spec (`rlatent.config.phase2.reward_names`)."""
        self._warned: set[str] = set()
        for i, spec in enumerate(self.specs):
            where = f"grpo.rewards[{i}]"
            fn = resolve_reward(spec.function, where=f"{where}.function")
            if not math.isfinite(spec.weight):
                raise ConfigError(f"{where}.weight: must be finite, got {spec.weight}")
            shadowed = sorted(set(spec.kwargs) & {*TRAJECTORY_FACTS, "prompts", "completions"})
            if shadowed:
                raise ConfigError(f"{where}.kwargs: {shadowed[0]!r} is a trajectory fact passed to every reward")
            self.required.append(_check_signature(fn, spec, where, strict=BUILTIN_REWARDS.get(spec.function) is fn))
            self.fns.append(fn)

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], facts: dict[str, Sequence[Any]]
    ) -> tuple[list[float], dict[str, list[float]], dict[str, int]]:
        """Score one batch of N completions (`prompts[i]` is the prompt of `completions[i]`).

        `facts` maps each trajectory fact and dataset column to N values. Returns the
        weighted total per completion, each reward's N values (after the error policy),
        and per reward the number of samples scored 0.0 because it failed on them.
        """
        n = len(completions)
        if len(prompts) != n or any(len(values) != n for values in facts.values()):
            sizes = {key: len(values) for key, values in facts.items()}
            raise RlatentError(f"rewards: {n} completions but {len(prompts)} prompts and facts of sizes {sizes}")
        total = [0.0] * n
        per_reward: dict[str, list[float]] = {}
        zeroed: dict[str, int] = {}
        for spec, fn, name, required in zip(self.specs, self.fns, self.names, self.required):
            clash = sorted(set(spec.kwargs) & set(facts))
            if clash:
                raise ConfigError(f"reward {spec.function!r}: config kwarg {clash[0]!r} shadows a dataset column")
            missing = [key for key in required if key not in facts]
            if missing:
                raise ConfigError(
                    f"reward {spec.function!r} needs {missing[0]!r}, which is neither a trajectory fact nor a "
                    f"dataset column (have: {', '.join(sorted(facts))})"
                )
            values, zeroed[name] = self._call(spec, fn, list(prompts), list(completions), facts)
            per_reward[name] = values
            for i, value in enumerate(values):
                total[i] += spec.weight * value
        return total, per_reward, zeroed

    def _call(self, spec: RewardSpec, fn: RewardFn, prompts: list[str], completions: list[str], facts: dict):
        """One reward's N checked values and how many were scored 0.0 under `reward_errors: zero`."""
        n = len(completions)
        kwargs = {key: list(values) for key, values in facts.items()} | spec.kwargs
        try:
            result = fn(prompts, completions, **kwargs)
        except RlatentError:
            raise  # a reward's own config error (a bad option) is not a per-sample failure
        except SystemExit as exc:  # sys.exit() in user code would end the run silently, with status 0
            raise RlatentError(f"reward {spec.function!r} called sys.exit({exc.code!r}); a reward must return "
                               "its values (or raise an exception)") from None
        except Exception as exc:
            message = f"reward {spec.function!r} raised {_exception_line(exc)}"
            if self.errors == "zero":
                self._warn(spec.function, message + f"; its {n} samples score 0.0")
                return [0.0] * n, n
            raise RlatentError(message + self._failing_sample(fn, spec, prompts, completions, facts)) from exc
        raw = _as_list(result)
        if raw is None or len(raw) != n:
            got = f"{len(raw)} values" if raw is not None else f"a {type(result).__name__}"
            message = f"reward {spec.function!r} returned {got} for {n} completions, expected a list of {n} floats"
            if self.errors == "zero":
                self._warn(spec.function, message + "; the batch scores 0.0")
                return [0.0] * n, n
            raise RlatentError(message)
        values, bad = [], 0
        for i, value in enumerate(raw):
            number = _as_float(value)
            if number is None or not math.isfinite(number):
                what = repr(value) if number is None else str(number)
                message = f"reward {spec.function!r} returned {what} for sample {i} ({_excerpt(completions[i])})"
                if self.errors == "raise":
                    raise RlatentError(message)
                self._warn(spec.function, message + "; scored 0.0")
                number, bad = 0.0, bad + 1
            values.append(number)
        return values, bad

    @staticmethod
    def _failing_sample(fn, spec, prompts, completions, facts) -> str:
        """Re-run a raising reward one sample at a time to name the first that fails.
        Costs at most one more batch of calls, and only on the way to stopping the run."""
        for i in range(len(completions)):
            one = {key: list(values[i : i + 1]) for key, values in facts.items()}
            try:
                fn(prompts[i : i + 1], completions[i : i + 1], **one, **spec.kwargs)
            except Exception:
                return f" on sample {i} ({_excerpt(completions[i])})"
        return " (on the whole batch; no single sample fails alone)"

    def _warn(self, function: str, message: str) -> None:
        if function not in self._warned:  # once per reward: counts go to the metrics every step
            self._warned.add(function)
            log.warning("%s (grpo.reward_errors: zero; further failures are only counted)", message)


def _check_signature(fn: RewardFn, spec: RewardSpec, where: str, strict: bool) -> tuple[str, ...]:
    """Check `fn` can be called as `fn(prompts, completions, **facts, **spec.kwargs)`; return the
    keyword arguments it requires (facts or dataset columns, checked against each batch)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()  # a C callable: nothing to inspect
    params = list(signature.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise ConfigError(f"{where}.function: {spec.function!r} must accept **kwargs (every reward gets every fact)")
    try:
        bound = signature.bind_partial([], [], **spec.kwargs)
    except TypeError as exc:
        usage = "fn(prompts, completions, **kwargs)"
        raise ConfigError(f"{where}: {spec.function!r} cannot be called as {usage}: {exc}") from None
    required = tuple(
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in bound.arguments
    )
    if strict:  # a built-in reads no option it does not name: a typo is an error, not a silent default
        options = [p.name for p in params if p.default is not p.empty]
        unknown = sorted(set(spec.kwargs) - set(options))
        if unknown:
            takes = ", ".join(options)
            raise ConfigError(f"{where}.kwargs: {spec.function!r} takes no option {unknown[0]!r} (it takes: {takes})")
        try:
            fn([], [], **{name: [] for name in required}, **spec.kwargs)
        except RlatentError as exc:
            raise ConfigError(f"{where}.kwargs: {exc}") from None
    return required


def reward_stats(per_reward: dict[str, Sequence[float]]) -> dict[str, float]:
    """`reward/<name>_mean` and `reward/<name>_std` (population std) for each reward."""
    stats = {}
    for name, values in per_reward.items():
        stats[f"reward/{name}_mean"] = statistics.fmean(values) if values else 0.0
        stats[f"reward/{name}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return stats


def _as_list(result: Any) -> list | None:
    """A reward's result as a list: a list or tuple, or a 1-D NumPy array / torch tensor."""
    if isinstance(result, (list, tuple)):
        return list(result)
    if hasattr(result, "tolist") and getattr(result, "ndim", None) == 1:
        return result.tolist()
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _exception_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _excerpt(text: str, width: int = 40) -> str:
    flat = " ".join(str(text).split())
    return '"' + (flat if len(flat) <= width else flat[: width - 3] + "...") + '"'
