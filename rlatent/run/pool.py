"""Functions run in child processes, a few at once, each stopped at a wall-clock limit.

`rlatent ablate --jobs N --timeout S` runs its cells this way. A process per cell, rather than a thread, is
what can be stopped from outside at the limit, and it keeps one cell's crash or memory from the others;
several small runs at once fill a GPU (or the cores) that one leaves idle. Each child writes its output to
a log file of its own: the progress lines of N runs on one terminal would read as noise.

This module imports nothing but the standard library, so a child starts by importing only what its
function needs.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

STOP_GRACE_SECONDS = 10.0
"""How long a child stopped at the limit (SIGTERM) has before it is killed."""
INTERRUPT_GRACE_SECONDS = 120.0
"""How long children interrupted with the parent (Ctrl-C reaches them too) have to write a checkpoint."""


@dataclass
class Job:
    key: str
    function: Callable[..., Any]  # a module-level function: the child finds it by name
    args: tuple
    log: Path


@dataclass
class Outcome:
    result: Any                 # what the function returned; None when it did not return
    exit_code: int | None       # None when stopped at the limit
    seconds: float

    @property
    def stopped(self) -> bool:
        return self.exit_code is None


@dataclass
class _Running:
    job: Job
    process: multiprocessing.process.BaseProcess
    reader: Connection
    started: float = field(default_factory=time.monotonic)
    result: Any = None


def run_jobs(jobs: list[Job], parallel: int, timeout: float | None, done: Callable[[Job, Outcome], None],
             poll: float = 0.5) -> None:
    """Run `jobs` in order, at most `parallel` at once, each in a fresh (spawned) process; call `done` in this
    process as each ends: returned, crashed, or stopped after `timeout` seconds (None: no limit)."""
    context = multiprocessing.get_context("spawn")  # forking a process that holds torch threads can hang
    pending, running = list(jobs), []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(job.function, job.args, str(job.log), writer),
                                          name=job.key)
                process.start()
                writer.close()
                running.append(_Running(job, process, reader))
            wait([r.reader for r in running] + [r.process.sentinel for r in running], timeout=poll)
            for entry in list(running):
                state = _state(entry, timeout)
                if state is not None:
                    running.remove(entry)
                    done(entry.job, Outcome(entry.result, None if state == "stopped" else entry.process.exitcode,
                                            time.monotonic() - entry.started))
    except KeyboardInterrupt:
        for entry in running:
            entry.process.join(INTERRUPT_GRACE_SECONDS / max(len(running), 1))
        raise
    finally:
        for entry in running:
            _stop(entry.process)


def _state(entry: _Running, timeout: float | None) -> str | None:
    """"exited", "stopped" (at the limit, now) or None (still running); the child's result read as it comes."""
    _receive(entry)
    if not entry.process.is_alive():
        entry.process.join()
        _receive(entry)  # sent just before it exited
        return "exited"
    if timeout is not None and time.monotonic() - entry.started > timeout:
        _stop(entry.process)
        return "stopped"
    return None


def _receive(entry: _Running) -> None:
    if entry.result is None and entry.reader.poll():
        try:
            entry.result = entry.reader.recv()
        except EOFError:  # the child exited without sending
            pass


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    process.terminate()
    process.join(STOP_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()


def _child(function: Callable[..., Any], args: tuple, log: str, writer: Connection) -> None:
    """In the child: output (this process's and any library's) to `log`, then send back what `function` returns."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    writer.send(function(*args))
    writer.close()
