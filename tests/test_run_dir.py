"""The run directory: layout, metrics log, plots, report."""

import json
import math

import pytest

from rlatent.io.atomic import atomic_directory
from rlatent.errors import RlatentError
from rlatent.io.plots import DASHBOARDS, collect_series, plot_run
from rlatent.run.report import latent_use_verdict
from rlatent.io.run_dir import (
    MetricsLogger,
    RunDir,
    metrics_table,
    read_metrics,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")
    assert run.path.is_dir() and run.checkpoints_dir.is_dir()
    assert run.config_path.name == "config.yaml"
    assert run.metrics_path.name == "metrics.jsonl"
    assert run.report_path.name == "report.md"
    assert run.checkpoint_path(123) == run.checkpoints_dir / "step_000123"
    run.save_config("lr: 0.001\n")
    assert run.config_path.read_text() == "lr: 0.001\n"


def test_latest_checkpoint_ignores_leftover_temp_dir(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (5, 40):
        with atomic_directory(run.checkpoint_path(step)) as tmp:
            (tmp / "state.pt").write_text("x")
    with pytest.raises(KeyboardInterrupt):  # killed while writing step 100
        with atomic_directory(run.checkpoint_path(100)):
            raise KeyboardInterrupt
    # A hard kill (no cleanup) leaves the temp dir behind.
    (run.checkpoints_dir / ".step_000200.tmp-abc123").mkdir()
    (run.checkpoints_dir / "step_000300.json").write_text("{}")  # not a directory
    assert run.latest_checkpoint() == run.checkpoint_path(40)


def test_latest_checkpoint_orders_by_step_number(tmp_path):
    run = RunDir(tmp_path)
    for name in ("step_000999", "step_1000000"):
        (run.checkpoints_dir / name).mkdir()
    assert run.latest_checkpoint().name == "step_1000000"


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    run = RunDir(tmp_path)
    with MetricsLogger(run) as logger:
        logger.log(1, {"loss": 2.5, "reward": float("nan")}, phase="grpo")
        logger.log(2, {"loss": float("inf"), "reward": 0.75}, phase="grpo")
        # flushed per line: readable before close, as after a kill
        assert len(run.metrics_path.read_text().splitlines()) == 2
    lines = run.metrics_path.read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:3] == ["step", "phase", "time"]
    assert first["step"] == 1 and first["phase"] == "grpo"
    assert first["loss"] == 2.5 and first["reward"] is None
    assert second["loss"] is None and second["reward"] == 0.75
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]
    assert isinstance(first["time"], float) and first["time"] > 1.6e9
    assert read_metrics(run.metrics_path) == [first, second]
    events = list(run.tensorboard_dir.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_metrics_logger_rejects_reserved_names(tmp_path):
    with MetricsLogger(RunDir(tmp_path)) as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1.0}, phase="sft")


def test_resumed_logger_appends_and_drops_partial_line(tmp_path):
    run = RunDir(tmp_path)
    with MetricsLogger(run) as logger:
        logger.log(1, {"loss": 1.0}, phase="sft")
    with run.metrics_path.open("a") as f:
        f.write('{"step": 2, "pha')  # write cut off by a kill
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1]
    with MetricsLogger(run) as logger:
        logger.log(2, {"loss": 0.5}, phase="sft")
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2]


def test_read_metrics_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "phase": "sft"}\n{oops\n{"step": 2, "phase": "sft"}\n')
    with pytest.raises(RlatentError, match=r"metrics\.jsonl:2: malformed"):
        read_metrics(path)


def test_plots_a_dashboard_and_the_rest_per_phase(tmp_path):
    run = RunDir(tmp_path)
    with MetricsLogger(run) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1 / step, "lm_loss": 2 / step, "lr": 1e-3 * step, "positions": 100}, "train")
            logger.log(step, {"reward_mean": 0.1 * step, "kl": 0.01 * step, "dead": math.nan, "clip_low": 0.0,
                              "sync_bytes": 1000 + step}, "grpo")
        logger.log(5, {"latent_gain_shuffle": 0.5}, "eval")  # a single point still shows
        logger.log(5, {"accuracy": 0.5}, "test")  # logged once: a table, not a curve
    records = read_metrics(run.metrics_path)
    paths = plot_run(records, run.plots_dir)
    assert sorted(p.name for p in paths) == ["grpo.png", "grpo_other.png", "sft.png", "sft_other.png"]
    for path in paths:
        assert path.parent == run.plots_dir and path.read_bytes()[:8] == PNG_SIGNATURE
    series = collect_series(records)
    assert "grpo/dead" not in series and series["grpo/kl"][-1] == (5, 0.05)
    # The dashboards hold the curves users read; the rest goes to *_other.png, constants as a footnote.
    dashboard_curves = {c for _, curves in DASHBOARDS["grpo"] for c in curves}
    assert {"grpo/reward_mean", "grpo/kl", "grpo/clip_low"} <= dashboard_curves
    assert "grpo/sync_bytes" not in dashboard_curves


def test_metrics_table_formats_four_significant_digits():
    table = metrics_table(
        [{"step": 1000, "loss": 0.123456, "reward": 12345.678}, {"step": 2000, "loss": 2.0}],
        ["step", "loss", "reward"],
    )
    assert table.splitlines() == [
        "| step | loss | reward |",
        "|---|---|---|",
        "| 1000 | 0.1235 | 1.235e+04 |",
        "| 2000 | 2 |  |",
    ]


def test_write_report_contains_title_sections_and_table(tmp_path):
    run = RunDir(tmp_path)
    table = metrics_table([{"step": 10, "accuracy": 0.66666}], ["step", "accuracy"])
    path = write_report(run, "GRPO on GSM8K", {"Summary": "Accuracy went up.", "Eval": table})
    assert path == run.report_path
    text = path.read_text()
    assert text.startswith("# GRPO on GSM8K\n")
    assert "## Summary\n\nAccuracy went up.\n" in text
    assert "## Eval\n" in text and "| 10 | 0.6667 |" in text
    assert text.index("## Summary") < text.index("## Eval")


@pytest.mark.parametrize("gains, expected", [
    ({}, "No latent gain was measured"),
    ({"latent_gain_zeros": 0.001, "latent_gain_noise": 0.002, "latent_gain_shuffle": 0.0}, "ignores its latents"),
    ({"latent_gain_zeros": 0.8, "latent_gain_noise": 0.5, "latent_gain_shuffle": 0.002}, "not for this problem"),
    ({"latent_gain_zeros": 0.8, "latent_gain_noise": 0.5, "latent_gain_shuffle": 0.3}, "this problem's computation"),
])
def test_latent_use_verdict_is_a_sentence_with_the_gains(gains, expected):
    verdict = latent_use_verdict(gains, warn_below=0.01)
    assert expected in verdict and "{" not in verdict
    for value in gains.values():
        assert f"{value:+.4f}" in verdict


def test_metrics_logger_drops_what_a_resumed_run_logs_again(tmp_path):
    run = RunDir(tmp_path)
    with MetricsLogger(run) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)}, phase="train")
    with run.metrics_path.open("a") as f:
        f.write('{"step": 4, "pha')  # a line cut off by a kill
    with MetricsLogger(run, keep=lambda record: record["step"] <= 2) as logger:
        assert logger.dropped == 1
        logger.log(3, {"loss": 30.0}, phase="train")
        assert logger.last_step == {"train": 3}
    assert [(r["step"], r["loss"]) for r in read_metrics(run.metrics_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_run_dir_for_reading_creates_nothing(tmp_path):
    run = RunDir(tmp_path / "absent", create=False)
    assert run.latest_checkpoint() is None and not run.path.exists()
