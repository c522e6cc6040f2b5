"""The prediction log of a real local model server whose disk fails under client load: its log
folder is a small tmpfs (root mounts it; CI runs as root) that fills up, then turns read-only.

Whatever the disk does, no client request fails; the workers' writers keep running, keep what
they could not write and write it once the disk takes writes again; rows beyond the buffer are
dropped and counted with the reason; `ctcd models describe` shows the error while it lasts; a
worker retired by a swap while the disk is full counts what it could not write on its way out.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocks import MLflowModelDeployer
from ctcd.client import rows_in
from ctcd.loadgen import Load
from ctcd.serving.predlog import read_log
from tests.interrupt import eventually
from tests.processes import missing

pytestmark = pytest.mark.server


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` for the block (unmounted after, whatever happens)."""
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root (CI runs the tests as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        missing(f"cannot mount a tmpfs on {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system has no space left; return it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError:
                continue
    return filler


@pytest.mark.timeout(900)
def test_the_log_survives_a_full_then_read_only_disk_and_resumes(versions, ctcd_home):
    deployer = MLflowModelDeployer(log_flush_s=0.5, log_buffer_rows=40)
    record = deployer.deploy_model(versions["good"])
    deployer.stop_model_server(record.uuid)
    folder = Path(str(record.prediction_log_dir))
    example = Path(record.local.runtime_dir, "models", record.model_version)
    body = (example / "serving_input_example.json").read_bytes()

    def seen():
        return deployer.get_model_server(record.uuid).summary()

    with tmpfs(folder, "8m"):
        deployer.start_model_server(record.uuid)
        with Load(record.prediction_url, body, clients=2) as load:
            _disk_full_then_read_only(deployer, record, folder, versions)
        requests, resets, per = load.stats.requests, load.stats.resets, rows_in(body)
        eventually(
            lambda: _total(seen()) >= requests * per,
            30,
            "every answered row written or counted as dropped",
        )
        time.sleep(2)  # a few more flushes: rows a retried request logged twice are written too
        rows = seen()["prediction_log_rows"]
        assert rows["written_rows"] + rows["dropped_rows"] <= (requests + resets) * per
        log = read_log(record.local.runtime_dir)  # every file whole
        assert len(log) == rows["written_rows"]
        assert set(log["model_version"]) == {versions[k].model_version for k in ("good", "better")}
    assert requests > 100 and load.stats.failed == 0, load.stats.errors


def _total(summary: dict) -> int:
    return (
        summary["prediction_log_rows"]["written_rows"]
        + summary["prediction_log_rows"]["dropped_rows"]
    )


def _disk_full_then_read_only(deployer, record, folder: Path, versions) -> None:
    def seen():
        return deployer.get_model_server(record.uuid).summary()

    def resumed(before: int) -> bool:
        now = seen()
        return now["prediction_log_error"] is None and (
            now["prediction_log_rows"]["written_rows"] > before + 20
        )

    eventually(lambda: seen()["prediction_log_rows"]["written_rows"] > 0, 60, "rows written")
    filler = fill(folder)
    eventually(
        lambda: "No space left on device" in str(seen().get("prediction_log_error")),
        60,
        "describe: the workers' own error",
    )
    dropped = eventually(
        lambda: {k: v for k, v in seen()["prediction_log_dropped"].items() if "No space" in k},
        60,
        "rows dropped, counted with the disk's error",
    )
    assert all(count > 0 for count in dropped.values()), dropped
    swapped = deployer.deploy_model(versions["better"])  # the old worker leaves: disk full
    assert swapped.status.value == "active"

    filler.unlink()  # space again: the writers resume by themselves
    before = seen()["prediction_log_rows"]["written_rows"]
    eventually(lambda: resumed(before), 60, "writes resuming once there is space")
    exits = {k: v for k, v in seen()["prediction_log_dropped"].items() if "worker left" in k}
    assert exits and "No space left on device" in next(iter(exits)), seen()

    remount(folder, "ro")
    shown = eventually(lambda: seen()["prediction_log_error"], 60, "describe: read-only")
    assert "read-only" in shown, shown
    time.sleep(2)  # a few failed flushes
    remount(folder, "rw")
    before = seen()["prediction_log_rows"]["written_rows"]
    eventually(lambda: resumed(before), 60, "writes resuming once the disk is writable")
