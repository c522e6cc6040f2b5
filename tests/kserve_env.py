"""Real components for the KServe tests, each in a venv of its own (built once with the
project's uv, cached under ~/.cache by its requirements, as tests/seldon_env.py does):

- `sdk`: the `kserve` SDK 0.21 (its typed API models generate the InferenceService CRD's
  schema, tests/kserve_crd.py) and `kserve-storage` 0.21 (KServe's storage-initializer code);
  they install together.
- `mlserver`: MLServer 1.7.1 + mlserver-mlflow 1.7.1 (KServe's `kserve-mlserver` runtime), with
  the MLflow, scikit-learn and skops of uv.lock so it loads the models ctcd logs, and
  `uvloop<0.22` (with 0.22 MLServer 1.7.1's inference workers die at start). It does not
  install beside Prefect 3.9 (fastapi pins).

The S3 bucket and MLflow server come from tests/seldon_env.py (the same real parts).
Locally a missing component skips with the reason; under CI=true it fails."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from tests.processes import missing

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = Path(__file__).with_name("kserve_crd.py")
# moto accepts any keys; these are planted to prove they reach only the Kubernetes Secret
# (and, through it, the storage initializer's environment).
ACCESS_KEY = "AKIA-CTCD-KSERVE-TEST"
SECRET_KEY = "kserve-S3cret-canary-71c9d0e4"
CRD_NAME = "inferenceservices.serving.kserve.io"


def require(ok: bool, reason: str) -> None:
    """Skip locally, fail under CI, when a component is missing."""
    if not ok:
        missing(reason)


def sdk_requirements() -> list[str]:
    return ["kserve==0.21.0", "kserve-storage==0.21.0"]


def mlserver_requirements() -> list[str]:
    pins = [f"{name}=={version(name)}" for name in ("mlflow", "scikit-learn", "skops", "pandas")]
    return ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop<0.22", *pins]


def cached_venv(name: str, requirements: list[str], probe: str) -> Path:
    """A venv with `requirements` (`probe` is a file in it that proves it is complete): built
    on first use aside, then renamed into place, so a half-built venv is never used."""
    key = hashlib.sha1("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = cache / "ctcd-tests" / f"{name}-{key}"
    if (venv / probe).exists():
        return venv
    uv = ROOT / ".tools" / "bin" / "uv"
    require(uv.exists(), f"{uv} is missing (`make venv` installs it)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"building-{name}-", dir=venv.parent))
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    try:
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
        require(False, f"could not build the {name} venv: {err.stderr or err}")
    except OSError:
        pass  # another session finished first
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return venv


def sdk_venv() -> Path:
    return cached_venv("kserve-sdk", sdk_requirements(), "bin/kserve-decrypt")


def mlserver_venv() -> Path:
    return cached_venv("mlserver", mlserver_requirements(), "bin/mlserver")


def crd_file() -> Path:
    """The generated CRD, cached in the SDK venv by the generator's own content."""
    venv = sdk_venv()
    digest = hashlib.sha1(GENERATOR.read_bytes()).hexdigest()[:12]
    out = venv / f"inferenceservice-crd-{digest}.json"
    if not out.exists():
        partial = out.with_suffix(f".{os.getpid()}.part")
        done = subprocess.run(
            [str(venv / "bin" / "python"), str(GENERATOR), str(partial)],
            capture_output=True, text=True,
        )  # fmt: skip
        require(done.returncode == 0, f"could not generate the CRD: {done.stderr[-2000:]}")
        partial.rename(out)
    return out


def install_crd(kube: httpx.Client) -> dict[str, Any]:
    """Create the CRD on the API server (once) and wait until it is established."""
    crd = json.loads(crd_file().read_text())
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    answer = kube.post(base, json=crd)
    assert answer.status_code in (201, 409), answer.text[:2000]
    deadline = time.monotonic() + 90  # the schema is large: ~10 s here
    while time.monotonic() < deadline:
        found = kube.get(f"{base}/{CRD_NAME}").json()
        conditions = (found.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return dict(found)
        time.sleep(0.2)
    raise AssertionError("the InferenceService CRD was not established")


def prepare() -> None:
    """Build every venv and the CRD (what .ci/run calls, so the tests find them cached)."""
    print(sdk_venv(), mlserver_venv(), crd_file(), sep="\n")


if __name__ == "__main__":
    prepare()
