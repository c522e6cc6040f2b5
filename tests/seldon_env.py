"""Real components for the Seldon tests: a real S3 API (moto_server) as the artifact root of a
real MLflow tracking server, rclone, and a venv with Seldon Core's own Python model server
(built once with the project's uv, cached under ~/.cache by its requirements).

Locally a missing component skips with the reason; under CI=true it fails."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from tests.processes import loopback_port, missing, start_logged, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "ctcd-models"
# moto accepts any keys; these are planted to prove they reach only the Kubernetes Secret.
ACCESS_KEY = "AKIA-CTCD-SELDON-TEST"
SECRET_KEY = "seldon-S3cret-canary-9f2e4c1a"


def require(ok: bool, reason: str) -> None:
    """Skip locally, fail under CI, when a component is missing."""
    if not ok:
        missing(reason)


def seldon_requirements() -> list[str]:
    return [
        "seldon-core==1.18.2",
        "mlflow-skinny==3.17.*",
        f"scikit-learn=={version('scikit-learn')}",
        f"skops=={version('skops')}",
        "pandas",
        "setuptools<81",
    ]


def seldon_venv() -> Path:
    """The venv with seldon-core-microservice; built on first use, then reused."""
    requirements = seldon_requirements()
    key = hashlib.sha1("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = cache / "ctcd-tests" / f"seldon-core-{key}"
    if (venv / "bin" / "seldon-core-microservice").exists():
        return venv
    uv = ROOT / ".tools" / "bin" / "uv"
    require(uv.exists(), f"{uv} is missing (`make venv` installs it)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=venv.parent))
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    try:  # built aside, relocatable, then renamed: a half-built venv is never used
        subprocess.run(
            [str(uv), "venv", "-q", "--relocatable", "-p", sys.executable, str(building)],
            check=True, env=env,
        )  # fmt: skip
        subprocess.run(
            [str(uv), "pip", "install", "-q", "-p", str(building / "bin" / "python"),
             *requirements],
            check=True, env=env, capture_output=True, text=True,
        )  # fmt: skip
        building.rename(venv)
    except subprocess.CalledProcessError as err:
        require(False, f"could not build the seldon-core venv: {err.stderr or err}")
    except OSError:
        pass  # another session finished first
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return venv


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    moto = Path(sys.executable).with_name("moto_server")
    require(moto.exists(), "moto_server is missing (the `moto[server]` dev dependency)")
    port = loopback_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_logged([str(moto), "-H", "127.0.0.1", "-p", str(port)], work / "moto.log")
    wait_healthy(proc, f"{url}/moto-api/", work / "moto.log", 60)
    import boto3

    boto3.client(
        "s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)  # fmt: skip
    return proc, url


def s3_environment(s3_url: str) -> dict[str, str]:
    """What an MLflow client or server needs to write to the bucket."""
    return {
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def start_mlflow(work: Path, s3_url: str, root: str) -> tuple[subprocess.Popen[bytes], str]:
    """A tracking server whose artifact root is the bucket; clients write there directly."""
    port = loopback_port()
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= s3_environment(s3_url)
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host=127.0.0.1",
        f"--port={port}", f"--backend-store-uri=sqlite:///{work / 'mlflow.db'}",
        f"--default-artifact-root={root}", "--no-serve-artifacts", "--workers=1",
    ]  # fmt: skip
    proc = start_logged(cmd, work / "mlflow.log", env=env, cwd=work)
    wait_healthy(proc, f"{uri}/health", work / "mlflow.log", 120)
    return proc, uri
