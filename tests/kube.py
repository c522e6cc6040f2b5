"""A loopback Kubernetes API server (etcd + kube-apiserver) from KUBEBUILDER_ASSETS, for
tests. No scheduler, controller manager or kubelet: Jobs are stored, pods never run."""

from __future__ import annotations

import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.processes import loopback_port, stop_group


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(pki: Path) -> None:
    pki.mkdir(parents=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=test-ca",
        cwd=pki,
    )
    (pki / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (
        ("server", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=admin", "client.ext"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
            cwd=pki,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            f"{name}.crt",
            cwd=pki,
        )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


@dataclass
class KubeAPI:
    url: str
    kubeconfig: Path
    pki: Path
    processes: list[subprocess.Popen[bytes]]

    def client(self) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return httpx.Client(base_url=self.url, verify=context, timeout=10)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            stop_group(proc, 15)


def start(assets: Path, work: Path) -> KubeAPI:
    pki = work / "pki"
    _certificates(pki)
    etcd_port, peer_port, api_port = loopback_port(), loopback_port(), loopback_port()
    etcd = f"http://127.0.0.1:{etcd_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    logs = work / "logs"
    logs.mkdir()
    processes = []

    def launch(cmd: list[str], log: str) -> None:
        with open(logs / log, "wb") as out:
            processes.append(
                subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    launch(
        [
            str(assets / "etcd"),
            "--name",
            "test",
            f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls={etcd}",
            f"--advertise-client-urls={etcd}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--unsafe-no-fsync",
        ],
        "etcd.log",
    )
    launch(
        [
            str(assets / "kube-apiserver"),
            f"--etcd-servers={etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            "--insecure-port=0",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--logtostderr=true",
            "--v=0",
        ],
        "apiserver.log",
    )
    api = KubeAPI(f"https://127.0.0.1:{api_port}", work / "kubeconfig", pki, processes)
    api.kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{api.url}", certificate-authority: {pki / "ca.crt"}}}
users:
- name: admin
  user: {{client-certificate: {pki / "admin.crt"}, client-key: {pki / "admin.key"}}}
contexts:
- name: test
  context: {{cluster: test, user: admin, namespace: default}}
current-context: test
""")
    deadline = time.monotonic() + 60
    with api.client() as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/readyz").status_code == 200:
                    return api
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    api.stop()
    raise RuntimeError(
        f"kube-apiserver did not become ready: {(logs / 'apiserver.log').read_text()[-2000:]}"
    )
