"""The image the ctcd-kubernetes pool runs, built with `make image` (deployments/image.sh:
podman, a base from Debian packages) and run from a real Job: a real `prefect server`,
`make deploy`, the real prefect-kubernetes worker submitting the Job to a real kube-apiserver,
the real kube-controller-manager turning it into a pod, and a TEST-SIDE KUBELET STAND-IN
(tests/kubelet.py) running that pod's container with podman. The flow run registers its model
in a real `mlflow server` on the host.

Needs podman (with runc), mmdebstrap when the base image is not built yet, and
KUBEBUILDER_ASSETS. Locally a missing piece skips these tests, saying which; under CI=true it
fails them.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from ctcd.names import FLOW_RUN_TAG
from tests.kubelet import KubeletStandIn, podman_run_args
from tests.processes import loopback_port, missing, start_logged, stop_group, wait_healthy
from tests.test_prefect_deployments import _api, _make_deploy, _wait

# The first test pays for the image build and a run in it (several minutes under load).
pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMAGE = "ctcd:test"
DEPLOYMENT = "training-pipeline/continuous-training-kubernetes"
CONTROLLERS = (
    "*,-nodeipam,-nodelifecycle,-csrsigning,-csrapproving,-csrcleaner,-cloud-node-lifecycle,"
    "-route,-service,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,"
    "-pvc-protection,-pv-protection,-ttl,-bootstrapsigner,-tokencleaner"
)


@pytest.fixture(scope="module")
def podman() -> None:
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "tests" / "containers.conf"))
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (apt-get install podman runc mmdebstrap)")
    done = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if done.returncode != 0:
        missing(f"podman does not work here: {done.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def image(podman) -> str:
    """`make image` through deployments/image.sh (the base is built once, then cached)."""
    base = os.environ.get("CTCD_BASE_IMAGE", "localhost/ctcd-base:bookworm")
    has_base = subprocess.run(["podman", "image", "exists", base]).returncode == 0
    if not has_base and shutil.which("mmdebstrap") is None:
        missing(f"no base image {base} and no mmdebstrap to build it")
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "deployments" / "image.sh"), IMAGE], capture_output=True, text=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    size = subprocess.run(
        ["podman", "image", "inspect", IMAGE, "--format", "{{.Size}}"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"\nimage {IMAGE}: {int(size) / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")
    return IMAGE


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=600)


def test_image_runs_as_non_root_with_the_locked_env_and_no_local_state(image) -> None:
    script = (
        "import os, sys, pathlib; print(os.getuid()); print(sys.prefix); "
        "print(sorted(p.name for p in pathlib.Path('.').iterdir())); "
        "import prefect, prefect_kubernetes, mlflow, sklearn, gunicorn; "
        "print(prefect.__version__); import flows.training, blocks, ctcd.serving.limits"
    )
    done = _podman("run", "--rm", image, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    uid, prefix, listing, prefect_version = done.stdout.split("\n")[:4]
    assert uid == "10001" and prefix == "/opt/ctcd/.venv" and prefect_version == "3.9.1"
    present = set(ast.literal_eval(listing))
    assert {"flows", "blocks", "deployments", "ctcd", "prefect.yaml", ".venv"} <= present
    assert not present & {".ctcd", ".git", ".tools", "tests", ".containerignore"}
    # .venv is the image's own, without the dev group (the build context's is ignored).
    dev = _podman("run", "--rm", image, "python", "-c", "import pytest")
    assert "No module named 'pytest'" in dev.stderr
    # The build's CA bundle mount is not in the image: its file is Debian's own.
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    inside = _podman("run", "--rm", image, "cat", str(host_ca)).stdout
    base_ca = _podman(
        "run",
        "--rm",
        os.environ.get("CTCD_BASE_IMAGE", "localhost/ctcd-base:bookworm"),
        "cat",
        str(host_ca),
    ).stdout
    assert inside == base_ca
    pyc = _podman("run", "--rm", image, "sh", "-c", "find /opt/ctcd/.venv -name '*.pyc' | wc -l")
    assert int(pyc.stdout) > 1000  # bytecode compiled at install


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real tracking server on the host's loopback; artifacts are uploaded through it."""
    work = tmp_path_factory.mktemp("mlflow-server")
    port = loopback_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(work / "artifacts"), "--workers", "1"]
    proc = start_logged(cmd, work / "server.log", cwd=work)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{url}/health", work / "server.log", 120)
    try:
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def prefect_deployed(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` (SQLite, loopback) with `make deploy` applied."""
    home = tmp_path_factory.mktemp("prefect-k8s")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        CTCD_LOCAL_API="0",
    )
    port = loopback_port()
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_logged(cmd, home / "server.log", env=env, cwd=ROOT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(proc, f"{api}/health", home / "server.log", 120)
        env["PREFECT_API_URL"] = api
        done = _make_deploy(env)
        assert done.returncode == 0, done.stdout + done.stderr
        yield env
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory) -> Iterator[Any]:
    """The session's kube-apiserver plus, for this module, the real kube-controller-manager
    (its Job controller makes the Job's pod and marks the Job complete or failed)."""
    if not os.environ.get("KUBEBUILDER_ASSETS"):
        missing("KUBEBUILDER_ASSETS is unset: no kube-apiserver to submit Jobs to")
    kube_api = request.getfixturevalue("kube_api")
    assets = Path(os.environ["KUBEBUILDER_ASSETS"])
    if not (assets / "kube-controller-manager").exists():
        missing(f"no kube-controller-manager in KUBEBUILDER_ASSETS ({assets})")
    log = tmp_path_factory.mktemp("kcm") / "kcm.log"
    pki = kube_api.pki
    cmd = [
        str(assets / "kube-controller-manager"),
        f"--kubeconfig={kube_api.kubeconfig}",
        "--port=0",
        "--secure-port=0",
        "--leader-elect=false",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        "--use-service-account-credentials=false",
        f"--controllers={CONTROLLERS}",
        "--logtostderr=true",
    ]
    proc = start_logged(cmd, log)
    with kube_api.client() as kube:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ctcd"}}
        created = kube.post("/api/v1/namespaces", json=namespace)
        assert created.status_code in (201, 409), created.text  # 409: another module made it
    try:
        yield kube_api
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def worker(prefect_deployed, cluster, image, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The real prefect-kubernetes worker on the ctcd-kubernetes pool, and the kubelet
    stand-in running the pods of namespace ctcd; yields the environment of the Prefect CLI."""
    work = tmp_path_factory.mktemp("k8s-worker")
    env = {**prefect_deployed, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env["KUBECONFIG"] = str(cluster.kubeconfig)
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "ctcd-kubernetes"]
    proc = start_logged([*cmd, "--type", "kubernetes"], work / "worker.log", env=env, cwd=ROOT)
    try:
        with KubeletStandIn(cluster, "ctcd", work / "pods") as kubelet:
            yield {
                **env,
                "CTCD_TEST_WORKER_LOG": str(work / "worker.log"),
                "CTCD_PODS": str(kubelet.logs),
            }
    finally:
        stop_group(proc)


def _run_deployment(env: dict[str, str], *flags: str) -> str:
    """`prefect deployment run` as README's Cluster section shows it; returns the run's id."""
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, *flags],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert found, done.stdout
    return found.group(1)


def _job(cluster: Any, run_id: str) -> dict[str, Any] | None:
    with cluster.client() as kube:
        selector = {"labelSelector": f"prefect.io/flow-run-id={run_id}"}
        found = kube.get("/apis/batch/v1/namespaces/ctcd/jobs", params=selector).json()
    return next(iter(found.get("items") or []), None)


def _state(env: dict[str, str], run_id: str) -> Any:
    with _api(env) as client:
        return client.read_flow_run(run_id).state


def _logs(env: dict[str, str], run_id: str) -> str:
    with _api(env) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def _explain(env: dict[str, str], run_id: str) -> str:
    pods = Path(env["CTCD_PODS"])
    containers = "\n".join(p.read_text()[-3000:] for p in pods.glob("*.log"))
    worker = Path(env["CTCD_TEST_WORKER_LOG"]).read_text()[-3000:]
    return f"run logs:\n{_logs(env, run_id)}\ncontainers:\n{containers}\nworker:\n{worker}"


def _final_state(env: dict[str, str], run_id: str, seconds: float) -> Any:
    def final() -> Any:
        state = _state(env, run_id)
        return state if state is not None and state.is_final() else None

    try:
        return _wait(final, seconds, f"flow run {run_id} to finish")
    except pytest.fail.Exception as err:
        raise AssertionError(f"{err}\n{_explain(env, run_id)}") from None


@pytest.fixture(scope="module")
def trained(worker, cluster, mlflow_server) -> dict[str, Any]:
    """README's path: `prefect deployment run ... --job-variable image=... --job-variable
    env=...`; the Job's pod runs the flow in the image."""
    tracking_env = json.dumps(
        {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    )
    run_id = _run_deployment(
        worker,
        *("--job-variable", f"image={IMAGE}", "--job-variable", f"env={tracking_env}"),
        *("--param", "model_type=linear"),
    )
    job = _wait(lambda: _job(cluster, run_id), 90, f"the Job of flow run {run_id}")
    submitted = time.monotonic()
    state = _final_state(worker, run_id, 420)
    seconds = time.monotonic() - submitted
    print(f"\nJob submitted -> flow run {state.name}: {seconds:.1f} s")
    assert state.is_completed(), f"{state!r}\n{_explain(worker, run_id)}"
    done = _wait(
        lambda: (_job(cluster, run_id) or {}).get("status", {}).get("succeeded"), 60, "Job"
    )
    return {"run_id": run_id, "job": job, "succeeded": done}


def test_a_flow_run_from_a_real_job_completes_in_the_image(
    trained, mlflow_server, tmp_path
) -> None:
    """The worker's Job, as the pod ran it: the image, Prefect's command, the pool's env with
    the run's tracking server; the Job controller saw the pod succeed; the version is in the
    host's tracking server, its artifacts uploaded there."""
    container = trained["job"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == IMAGE
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert env["PREFECT__FLOW_RUN_ID"] == trained["run_id"]
    assert env["MLFLOW_TRACKING_URI"] == mlflow_server
    assert trained["succeeded"] == 1
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    [version] = client.search_model_versions("name='customer-satisfaction'")
    run = client.get_run(version.run_id)
    assert run.data.params["model_type"] == "linear"
    assert run.data.tags[FLOW_RUN_TAG] == trained["run_id"]
    # The sample table was generated in the pod's CTCD_HOME (the pool's and the image's).
    assert run.data.tags["ctcd.data_source"].startswith("/var/lib/ctcd/")
    # Its artifacts went to the host's server (proxied uploads), not the pod's disk.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    reference = client.download_artifacts(version.run_id, "reference", str(tmp_path))
    assert (Path(reference) / "reference.parquet").stat().st_size > 0


def test_the_image_serves_the_version_the_job_registered(trained, mlflow_server) -> None:
    """The same image runs a model server: ctcd's deployer inside it serves version 1 from
    the host's tracking server and answers a prediction."""
    script = """
from blocks import DeploymentConfig, MLflowModelDeployer
from ctcd.sample import generate
from flows.data import feature_frame
config = DeploymentConfig(model_name="customer-satisfaction", model_version="1",
    model_uri="models:/customer-satisfaction/1", pipeline_name="image", step_name="serve")
deployer = MLflowModelDeployer()
service = deployer.deploy_model(config, timeout=120)
try:
    rows = feature_frame(generate(n_rows=40), "review_score").head(3)
    print(service.model_version, len(service.predict(rows)))
finally:
    deployer.delete_model_server(service.uuid)
"""
    done = _podman(
        "run",
        "--rm",
        "--network",
        "host",
        "--env",
        f"MLFLOW_TRACKING_URI={mlflow_server}",
        IMAGE,
        "python",
        "-c",
        script,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split()[-2:] == ["1", "3"]


def _delete_job(cluster: Any, job: dict[str, Any]) -> None:
    with cluster.client() as kube:
        kube.delete(
            f"/apis/batch/v1/namespaces/ctcd/jobs/{job['metadata']['name']}",
            params={"propagationPolicy": "Background"},
        )


def test_a_job_whose_image_is_missing_says_so_on_the_flow_run(worker, cluster) -> None:
    """A wrong tag: the pod cannot start (ErrImagePull, as a kubelet reports it) and the
    flow run's own log says which image failed and what to check; the run never starts."""
    run_id = _run_deployment(worker, "--job-variable", "image=ctcd:no-such-tag")

    def diagnosed() -> str | None:
        logs = _logs(worker, run_id)
        return logs if "Image pull failed" in logs else None

    logs = _wait(diagnosed, 120, f"the image-pull diagnosis on flow run {run_id}")
    assert 'Failed to pull image "ctcd:no-such-tag"' in logs
    assert "Verify the image name and tag" in logs
    state = _state(worker, run_id)
    assert not (state.is_running() or state.is_final()), state
    job = _job(cluster, run_id)
    assert job is not None and not job.get("status", {}).get("succeeded")
    _delete_job(cluster, job)


def test_a_job_whose_container_fails_fails_the_flow_run(worker, cluster) -> None:
    """The run's env points the flow at a tracking server that is not there: the flow fails
    in the pod and the flow run is Failed, naming the server."""
    nowhere = f"http://127.0.0.1:{loopback_port()}"
    bad_env = json.dumps({"MLFLOW_TRACKING_URI": nowhere, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    run_id = _run_deployment(
        worker,
        *("--job-variable", f"image={IMAGE}", "--job-variable", f"env={bad_env}"),
        *("--param", "model_type=linear"),
    )
    state = _final_state(worker, run_id, 300)
    assert state.is_failed(), f"{state!r}\n{_explain(worker, run_id)}"
    assert nowhere in (state.message or "") + _logs(worker, run_id)

    # `prefect flow-run execute` exits 0 once it has reported the failure itself (Prefect
    # 3.9), so the pod ends Succeeded and the Job completes: the failure is the flow run's.
    def finished() -> Any:
        return ((_job(cluster, run_id) or {}).get("status") or {}).get("succeeded")

    assert _wait(finished, 120, "the Job controller to mark the Job finished") == 1


def test_the_stand_in_starts_the_container_exactly_as_the_pod_says() -> None:
    """The TEST-SIDE KUBELET STAND-IN's podman command: command replaces the entrypoint, args
    follow the image, env and working dir as given, host network, no pulls."""
    pod = {
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "ctcd:x",
                    "command": ["python"],
                    "args": ["-c", "print(1)"],
                    "env": [{"name": "A", "value": "1=2"}],
                    "workingDir": "/opt/ctcd",
                }
            ]
        }
    }
    cmd = podman_run_args(pod, "n")
    assert cmd[cmd.index("--entrypoint") + 1] == '["python"]'
    assert cmd[-3:] == ["ctcd:x", "-c", "print(1)"]
    assert {"--network", "host", "--env", "A=1=2", "--workdir", "/opt/ctcd"} <= set(cmd)
