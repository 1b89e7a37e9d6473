"""User-facing errors.

Every bad input ends in one `RlatentError` whose message is a single line that
names what is wrong and where (config key, file and line, reward, checkpoint).
The CLI prints that line and exits with status 2 instead of a traceback.
"""


class RlatentError(Exception):
    """An error caused by the user's input, reported as one line."""


class ConfigError(RlatentError):
    """A config file or override is invalid (names the full key path)."""


class DataError(RlatentError):
    """A data file, line or calculator mark is malformed (names file and line)."""


class ModelError(RlatentError):
    """A model or tokenizer cannot be used (names the model and what is missing)."""


class CheckpointError(RlatentError):
    """A checkpoint is missing, corrupt or incompatible (names the path)."""


class TrainingError(RlatentError):
    """Training cannot continue (NaN loss, out of memory); names the step."""


class LearnerFailure(TrainingError):
    """The learner (a Ray actor) died or raised; the run stops with a resumable checkpoint."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty): a library's reason, quoted in ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
