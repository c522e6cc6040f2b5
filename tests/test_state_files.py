"""State files and the prediction log's writer, in process (no server): a garbled file is named
with what is wrong and what repairs it, a rewrite moves the generation forward past what any
file names, the master's history of what served, and a writer whose disk refuses keeps its
rows, resumes, and counts what a leaving worker could not write."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from ctcd.exceptions import StateFileError
from ctcd.serving import desired as ds
from ctcd.serving.logstats import read_health
from ctcd.serving.predlog import PredictionLog, read_log, read_stats
from ctcd.serving.settings import ServerSettings

pytestmark = pytest.mark.unit

MODEL = ds.ServedModel(
    model_name="m", model_version="3", model_uri="models:/m/3", model_path="/x/models/3"
)


def test_a_garbled_desired_state_is_named_and_rewritten_forward(tmp_path: Path) -> None:
    runtime = tmp_path / "0123456789abcdef"
    (runtime / ds.WORKERS).mkdir(parents=True)
    assert ds.read_desired(runtime) is None  # none yet is not an error
    assert ds.set_desired(runtime, MODEL, 2) == 1
    (runtime / ds.WORKERS / "77.json").write_text(json.dumps({"generation": 6}))
    for text, problem in [
        ('{"model_name": "m", "model_vers', "not valid JSON"),
        ('{"model_name": "m"}', "model_version: field required"),
        ('{"model_name": "m", "model_version": "3", "model_uri": "u", "model_path": "p", '
         '"workers": "two", "generation": 1}', "workers: input should be a valid integer"),
    ]:  # fmt: skip
        (runtime / ds.CURRENT).write_text(text)
        with pytest.raises(StateFileError) as info:
            ds.read_desired(runtime)
        message = str(info.value)
        assert str(runtime / ds.CURRENT) in message and problem in message, message
        assert "ctcd models start 01234567" in message
    assert ds.set_desired(runtime, MODEL, 2) == 7  # past the generation a worker announced
    assert ds.read_desired(runtime) == ds.DesiredState(
        **MODEL.model_dump(), workers=2, generation=7,
        written_at=ds.read_desired(runtime).written_at,  # type: ignore[union-attr]
    )  # fmt: skip
    assert ds.revert_to_stable(runtime, 2, 7, "4", "bad") is None  # no stable model yet


def test_the_history_is_what_the_master_converged_on(tmp_path: Path) -> None:
    def converge(version: str, generation: int) -> None:
        model = MODEL.model_copy(update={"model_version": version})
        ds.write_stable(tmp_path, ds.DesiredState(**model.model_dump(), workers=1,
                                                  generation=generation))  # fmt: skip

    for generation, version in enumerate(["1", "2", "2", "1"], start=1):
        converge(version, generation)  # a re-deploy of the same version adds nothing
    stable = ds.read_stable(tmp_path)
    assert stable is not None and stable.history == ["1", "2", "1"] and stable.generation == 4
    assert ds.master_recorded(tmp_path, 4) and not ds.master_recorded(tmp_path, 5)
    (tmp_path / ds.STABLE).write_text("{")  # unreadable: the history is unknown from now on
    with pytest.raises(StateFileError, match="stable.json is unreadable"):
        ds.read_stable(tmp_path)
    converge("5", 5)
    assert ds.read_stable(tmp_path).history is None  # type: ignore[union-attr]
    ds.seed_history(tmp_path, ["1", "2", "1", "5"])  # a start gives it the record's
    converge("6", 6)
    assert ds.read_stable(tmp_path).history == ["1", "2", "1", "5", "6"]  # type: ignore[union-attr]


def test_a_writer_whose_disk_refuses_keeps_its_rows_and_resumes(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0]})
    log = PredictionLog(tmp_path, "7", ServerSettings(log_flush_s=5, log_buffer_rows=10))
    day = tmp_path / "predictions" / datetime.now(UTC).strftime("date=%Y-%m-%d")
    day.write_text("a file where the log needs a folder: every write fails")
    for i in range(5):  # 10 rows: the buffer is full
        log.record(f"r{i}", frame, [0.1, 0.2])
    log.flush()  # fails: the rows stay buffered
    for i in range(5, 8):  # 6 rows more: dropped, with the error that keeps the buffer full
        log.record(f"r{i}", frame, [0.1, 0.2])
    log.flush()
    assert read_stats(tmp_path) == {"written_rows": 0, "dropped_rows": 6}
    health = read_health(tmp_path, {os.getpid()})
    assert health.error and "cannot write" in health.error and "Not a directory" in health.error
    [(reason, rows)] = health.dropped.items()
    assert rows == 6 and reason.startswith("buffer full while writes fail (NotADirectoryError")
    day.unlink()  # the disk takes writes again
    log.flush()
    assert read_stats(tmp_path) == {"written_rows": 10, "dropped_rows": 6}
    assert read_health(tmp_path, {os.getpid()}).error is None
    assert sorted(read_log(tmp_path)["request_id"].unique()) == [f"r{i}" for i in range(5)]

    shutil.rmtree(day)
    day.write_text("again")
    log.record("late", frame, [0.1, 0.2])
    log.close()  # a leaving worker that cannot write: its rows are counted, with the reason
    dropped = read_health(tmp_path, set()).dropped
    [(reason, rows)] = [(k, v) for k, v in dropped.items() if "worker left" in k]
    assert rows == 2 and reason.startswith("not written before the worker left (NotADirectory")
