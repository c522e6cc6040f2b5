"""A plain `mlflow server` subprocess (SQLite back end, proxied artifacts) that a test can stop
and start again on the same port and store, to put MLflow down at a chosen moment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.processes import loopback_port, start_logged, stop_group, wait_healthy


class MlflowServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = loopback_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        cmd = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{self.folder / 'mlflow.db'}",
            f"--artifacts-destination={self.folder / 'artifacts'}",
        ]
        log = self.folder / "server.log"
        self.proc = start_logged(cmd, log, env=env, cwd=self.folder)
        wait_healthy(self.proc, f"{self.uri}/health", log, 120)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 10)
            self.proc = None
