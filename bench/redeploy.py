"""Zero-downtime redeploys: steady keep-alive load while the model is redeployed 5 times.

    .venv/bin/python bench/redeploy.py

For 1 and 2 workers, and 1 and 4 clients: requests that failed after one retry (goal 0),
raw connection resets (goal 0), the longest request (goal < 1 s), p50/p99, and the time from
the deploy call until only the new version answers, beside the model's own load time.
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import isolated_home, register_two_versions, single_row_body

LOAD_TIME = """
import time, mlflow.pyfunc, sklearn.ensemble, skops.io
t = time.perf_counter(); mlflow.pyfunc.load_model(PATH); print(time.perf_counter() - t)
"""


def main() -> None:
    isolated_home()
    from blocks import MLflowModelDeployer
    from blocks import local_process as lp
    from ctcd.loadgen import Load

    print("training two versions on the 115,609-row sample ...", flush=True)
    v1, v2 = register_two_versions()
    for workers in (1, 2):
        deployer = MLflowModelDeployer(workers=workers)
        record = deployer.deploy_model(v1)
        model_dir = f"{record.local.runtime_dir}/models/{record.model_version}"
        load_s = float(
            subprocess.run(
                [sys.executable, "-c", LOAD_TIME.replace("PATH", repr(model_dir))],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for clients in (1, 4):
            deploy_s = []
            with Load(record.prediction_url, single_row_body(record), clients) as load:
                time.sleep(1)
                for i in range(5):
                    config = (v2, v1)[i % 2]
                    start = time.perf_counter()
                    record = deployer.deploy_model(config)
                    deploy_s.append(time.perf_counter() - start)
                    assert lp.served_version(record) == config.model_version
                time.sleep(1)
            s = load.stats
            print(
                f"workers={workers} clients={clients}: {s.requests} requests, "
                f"failed after retry {s.failed}, raw resets {s.resets}, "
                f"longest {s.longest * 1000:.0f} ms, p50 {s.percentile(50) * 1000:.1f} ms, "
                f"p99 {s.percentile(99) * 1000:.1f} ms | deploy call "
                f"{min(deploy_s):.2f}-{max(deploy_s):.2f} s (model load {load_s:.2f} s)",
                flush=True,
            )
        deployer.delete_model_server(record.uuid)


if __name__ == "__main__":
    main()
