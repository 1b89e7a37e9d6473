"""Crash-safe writes: nothing already written is lost, bad files fail in one line."""

import json
import random

import pytest
import torch

from rlatent.io.atomic import (
    atomic_directory,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    capture_rng_state,
    load_state,
    load_tensors,
    restore_rng_state,
    save_state,
    save_tensors,
)
from rlatent.errors import CheckpointError


def test_atomic_write_text_and_json_replace_content(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"

    json_path = tmp_path / "a.json"
    atomic_write_json(json_path, {"b": 1, "a": [1, 2]})
    text = json_path.read_text()
    assert json.loads(text) == {"b": 1, "a": [1, 2]}
    assert text.index('"b"') < text.index('"a"')  # insertion order, not sorted
    assert '\n  "b": 1' in text  # indent 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt"]  # no temp left


def test_atomic_file_keeps_old_content_when_body_raises(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write_text(path, "complete")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(path) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_atomic_directory_creates(tmp_path):
    target = tmp_path / "step_000001"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "w.txt").write_text("x")
        assert not target.exists()
    assert (target / "w.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_atomic_directory_replaces_existing(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # old copy deleted


def test_atomic_directory_leaves_old_intact_when_body_raises(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("crash mid-checkpoint")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # temp removed


def test_save_load_tensors_roundtrip_makes_contiguous_copies(tmp_path):
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": weight, "w_t": weight.t(), "tied": weight}  # non-contiguous, shared storage
    path = tmp_path / "heads.safetensors"
    save_tensors(path, tensors)
    loaded = load_tensors(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
        assert loaded[name].device.type == "cpu"


def test_load_tensors_corrupt_file_is_one_line_checkpoint_error(tmp_path):
    path = tmp_path / "heads.safetensors"
    save_tensors(path, {"w": torch.ones(64)})
    path.write_bytes(path.read_bytes()[:-10])  # truncated, as by a crash without atomic writes
    with pytest.raises(CheckpointError) as info:
        load_tensors(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_load_tensors_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_tensors(path)
    assert str(path) in str(info.value)


def _draws():
    return [random.random() for _ in range(3)], torch.rand(3)


def test_rng_capture_restore_reproduces_draws():
    random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = capture_rng_state()
    py_first, torch_first = _draws()
    restore_rng_state(state)
    py_again, torch_again = _draws()
    assert py_first == py_again
    assert torch.equal(torch_first, torch_again)


def test_rng_state_roundtrips_through_weights_only_state_file(tmp_path):
    np = pytest.importorskip("numpy")
    random.seed(2)
    torch.manual_seed(2)
    np.random.seed(2)
    path = tmp_path / "trainer_state.pt"
    save_state(path, {"step": 7, "rng": capture_rng_state()})
    expected = (*_draws(), np.random.rand(3))

    random.seed(99)
    torch.manual_seed(99)
    np.random.seed(99)
    loaded = load_state(path)  # weights_only=True inside
    restore_rng_state(loaded["rng"])
    assert loaded["step"] == 7
    py, t, n = (*_draws(), np.random.rand(3))
    assert py == expected[0]
    assert torch.equal(t, expected[1])
    assert (n == expected[2]).all()


def test_save_load_state_optimizer_roundtrip(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    path = tmp_path / "optim.pt"
    save_state(path, opt.state_dict())
    loaded = load_state(path)
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_load_state_corrupt_is_one_line_checkpoint_error(tmp_path, content):
    path = tmp_path / "trainer_state.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_state(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_load_state_refuses_arbitrary_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": object()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state(path)


def test_load_state_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "absent.pt")


def test_atomic_writes_get_the_modes_open_and_mkdir_would_give(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        with atomic_directory(tmp_path / "step_000001") as tmp:
            (tmp / "f").write_text("y")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o644, "t.safetensors": 0o644, "step_000001": 0o755, "private.txt": 0o600}


def test_safetensors_problem_names_a_cut_short_file(tmp_path):
    from rlatent.io.atomic import safetensors_problem

    path = tmp_path / "w.safetensors"
    save_tensors(path, {"w": torch.zeros(64)})
    assert safetensors_problem(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    assert safetensors_problem(path) == f"truncated: {len(whole) - 10} of {len(whole)} bytes"
    path.write_bytes(whole[:5])
    assert safetensors_problem(path).startswith("truncated")
    path.write_bytes(whole + b"xx")
    assert safetensors_problem(path) == "corrupt: 2 bytes after the last tensor"
