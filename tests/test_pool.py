"""`rlatent.run.pool`: functions in child processes, a few at once, their results sent back, their output in
their own log, a crash reported by its exit code and a job past the limit stopped."""

import operator
import time

import pytest

from rlatent.run.pool import Job, run_jobs


@pytest.mark.slow
def test_results_logs_crashes_and_the_time_limit(tmp_path):
    jobs = [Job("add", operator.add, (2, 3), tmp_path / "add.log"),
            Job("sleep", time.sleep, (600,), tmp_path / "sleep.log"),
            Job("print", print, ("hello from the child",), tmp_path / "print.log"),
            Job("crash", operator.truediv, (1, 0), tmp_path / "crash.log")]
    outcomes, order = {}, []

    def done(job, outcome):
        outcomes[job.key] = outcome
        order.append(job.key)

    run_jobs(jobs, parallel=2, timeout=20.0, done=done)  # the limit leaves room for a slow start on a busy machine
    assert (outcomes["add"].result, outcomes["add"].exit_code) == (5, 0)
    assert outcomes["sleep"].stopped and outcomes["sleep"].seconds >= 20.0
    assert (outcomes["print"].result, outcomes["print"].exit_code) == (None, 0)
    assert (tmp_path / "print.log").read_text() == "hello from the child\n"
    assert outcomes["crash"].exit_code == 1 and not outcomes["crash"].stopped
    assert "ZeroDivisionError" in (tmp_path / "crash.log").read_text()
    assert order.index("sleep") > order.index("add")  # the sleeper held one of the two places all along
