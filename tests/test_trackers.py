"""`output.report_to`: TensorBoard and Weights & Biases receive what metrics.jsonl holds.

W&B runs offline (WANDB_MODE=offline): its local run file is read back record by record, so the test checks
the values W&B would upload, not only that a file appeared.
"""

import json
import sys
from pathlib import Path

import pytest

from rlatent.config import load_config
from rlatent.errors import ConfigError
from rlatent.io.run_dir import MetricsLogger, RunDir, read_metrics
from rlatent.io.trackers import WANDB_ID_FILE
from rlatent.run.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last); a block's tail shorter
    than a header is padding."""
    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_history(run_path: Path) -> list[dict]:
    """Every `log` call of every W&B run file under `run_path`, in the order written, as {key: value}. The
    files are taken oldest first by modification time: W&B names a run's directory by the second it started,
    adding "-1" when a resume starts in the same second, and that name sorts before the first one's."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_path.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item if not (item.key or item.nested_key[0]).startswith("_")})
    return rows


def expected_history(metrics_path: Path) -> list[dict]:
    """What W&B should hold for metrics.jsonl: each record on its phase's own step axis."""
    return [{f"{r['phase']}/step": r["step"],
             **{f"{r['phase']}/{k}": v for k, v in r.items() if k not in ("step", "phase", "time")}}
            for r in read_metrics(metrics_path)]


def test_wandb_gets_every_record_and_a_reopened_logger_goes_on_with_the_same_run(tmp_path, wandb_offline):
    run = RunDir(tmp_path / "run")
    with MetricsLogger(run, report_to=["wandb"], config={"seed": 3}) as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-3}, phase="sft")
        logger.log(1, {"accuracy": 0.25}, phase="eval")
        logger.log(2, {"loss": 2.0, "lr": 1e-3}, phase="sft")
    run_id = (run.path / WANDB_ID_FILE).read_text().strip()
    with MetricsLogger(run, report_to=["wandb"], config={"seed": 3}) as logger:  # a resumed run
        logger.log(1, {"loss": 0.125}, phase="grpo")
    assert (run.path / WANDB_ID_FILE).read_text().strip() == run_id
    files = sorted(run.path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}
    assert wandb_history(run.path) == expected_history(run.metrics_path)
    assert not run.tensorboard_dir.exists()  # only what report_to names


def test_a_run_reports_to_wandb_what_metrics_jsonl_holds(tiny_model_dir, tmp_path, wandb_offline):
    argv = ["sft", str(REPO / "configs" / "tiny.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"output.dir={tmp_path}", "output.name=run", "output.report_to=[tensorboard, wandb]",
            "output.wandb_project=rlatent-tests", "sft.steps=2", "sft.eval_every=1", "sft.batch_size=2",
            "data.synthetic.num_train=8", "data.synthetic.num_eval=4", "eval.limit=4", "eval.batch_size=4",
            "eval.max_new_tokens=8", "eval.num_samples=2"]
    assert main(argv) == 0
    run = tmp_path / "run"
    history = wandb_history(run)
    assert history == expected_history(run / "metrics.jsonl")
    assert {"train/loss", "eval/lm_loss", "test/accuracy"} <= set().union(*history)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_nothing_writes_metrics_jsonl_only(tmp_path):
    run = RunDir(tmp_path)
    with MetricsLogger(run, report_to=[]) as logger:
        logger.log(1, {"loss": 1.0}, phase="sft")
    assert [r["loss"] for r in read_metrics(run.metrics_path)] == [1.0]
    assert not run.tensorboard_dir.exists() and not (tmp_path / "wandb").exists()


def test_an_unknown_tracker_is_refused_in_the_config():
    with pytest.raises(ConfigError, match=r"output\.report_to"):
        load_config(None, ["output.report_to=[mlflow]"])


def test_wandb_missing_is_one_clear_error_and_no_half_open_tracker(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"output\.report_to: wandb is not installed"):
        MetricsLogger(RunDir(tmp_path), report_to=["tensorboard", "wandb"])
