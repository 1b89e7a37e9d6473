"""Crash-safe writes for everything a run leaves behind.

A run can be killed at any moment (pre-emption, out of memory, Ctrl-C). Every
file here is written to a temporary name in the same directory, flushed and
fsynced, then moved into place with `os.replace`, which is atomic on POSIX: a
reader sees either the old complete file or the new complete file, never a
half-written one. The temporary lives in the same directory because a rename
across filesystems is a copy, not atomic.

Trainer state is saved with `torch.save` and read back with
`torch.load(weights_only=True)`, so loading a checkpoint can never run code
from a pickle. That is why RNG states are captured as tensors and plain Python
values (`capture_rng_state`) rather than as the objects the libraries return.
"""

import contextlib
import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from rlatent.errors import CheckpointError

try:
    import numpy as np
except ImportError:  # numpy is optional; its RNG is only captured when present
    np = None


def _umask() -> int:
    """The process umask, read without changing it (from /proc where it can be, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Persist a rename: the new directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the body completes.

    For writers that need a file object (torch.save, savefig); on an
    exception the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give (0644 under umask 022)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that a crash leaves the old file or the new one."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, keys in insertion order, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` when the body completes.

    Used for checkpoints, which are several files that must appear together.
    The temporary is a hidden sibling (`.NAME.tmp-*`), so a crash leaves only
    a dot-directory that `RunDir.latest_checkpoint` ignores. On an exception
    the temporary is removed and an existing `path` is untouched.

    An existing `path` is renamed aside, the new directory renamed in, then
    the old one deleted: POSIX cannot atomically replace a non-empty
    directory, so a crash between the two renames leaves the old contents at
    `.NAME.old-*` rather than losing them.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would give (0755 under umask 022)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
    else:
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old)
    _fsync_directory(path.parent)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Save named tensors as safetensors, atomically.

    Each tensor is copied to a contiguous CPU tensor first: safetensors needs
    contiguous storage, and copying also breaks storage sharing (tied
    weights), which safetensors refuses to serialise.
    """
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    data = safetensors.torch.save(cpu)
    with atomic_file(path) as f:
        f.write(data)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU; a missing or corrupt file is a `CheckpointError`."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: tensor file not found")
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a safetensors file cannot be loaded (cut short, trailing bytes, unreadable header), or None.

    Reads only the header, so checking a model directory before loading it costs nothing: a file cut
    off by a full disk or an interrupted copy is named here instead of failing deep inside a library.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"truncated: {size} bytes, not even a header"
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            return f"truncated: {size} bytes, the header alone needs {length + 8}"
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            return "corrupt: its header is not valid JSON"
    if not isinstance(header, dict):
        return "corrupt: its header is not a JSON object"
    try:
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "corrupt: its header has a tensor without data offsets"
    data = size - 8 - length
    if end > data:
        return f"truncated: {size} of {end + 8 + length} bytes"
    if end < data:
        return f"corrupt: {data - end} bytes after the last tensor"
    return None


def save_state(path: str | os.PathLike, obj: Any) -> None:
    """Save trainer state (optimizer, scheduler, RNG, counters) with `torch.save`, atomically.

    `obj` must hold only tensors and plain Python values so that `load_state`
    can read it with `weights_only=True`.
    """
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_state(path: str | os.PathLike) -> Any:
    """Load state written by `save_state`; never unpickles arbitrary objects."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: state file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # torch's own message spans many lines; the type is enough to debug.
        reason = f"corrupt or not loadable with weights_only=True ({type(e).__name__})"
        raise CheckpointError(f"{path}: state file {reason}") from e


def capture_rng_state() -> dict[str, Any]:
    """Return every RNG state a run depends on, as tensors and plain values.

    Covers Python `random`, numpy's global RNG when numpy is installed, torch
    CPU and every CUDA device when CUDA is available. The result survives
    `save_state` / `load_state` with `weights_only=True`.
    """
    version, mt_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),  # (625,)
            "gauss_next": gauss_next,
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if np is not None:
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by `capture_rng_state`.

    Parts absent from `state` (numpy or CUDA when the saving machine lacked
    them) are left as they are.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    torch.set_rng_state(state["torch_cpu"])
    if np is not None and "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
