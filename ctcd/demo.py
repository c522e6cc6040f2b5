"""What `make demo` runs: continuous deployment on the sample table, then one prediction."""

from __future__ import annotations

import os

from ctcd.sample import DEFAULT_ROWS


def run(rows: int = DEFAULT_ROWS) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from ctcd import local_api

    local_api.prepare()  # the local Prefect server starts while the flows import
    from ctcd.sample import generate, sample_path
    from flows.continuous_deployment import continuous_deployment_pipeline
    from flows.data import feature_frame
    from flows.model import DEFAULTS

    data_path = None if rows == DEFAULT_ROWS else str(sample_path(rows))
    result = continuous_deployment_pipeline(data_path=data_path)
    print(
        f"\nmodel {result.model_name} v{result.model_version}: "
        + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    )
    print(f"gate: {'deployed' if result.deployed else 'refused'} - {result.reason}")
    server = local_api.recorded()
    if server is not None:
        print(
            f"Prefect UI (the run, its tasks, logs and report): {server.url}\n"
            "  a local Prefect server ctcd started; it keeps running for the next runs. "
            "Stop it with `.venv/bin/ctcd prefect-server stop`."
        )
    service = result.service
    if service is None:
        print("No server is serving this model (the gate refused it and none ran before).")
        return
    row = feature_frame(generate(n_rows=1, seed=7), "review_score")
    prediction = service.predict(row)[0]
    print(f"\nprediction for one order: review_score ~ {prediction:.3f}")
    print(f"prediction URL: {service.prediction_url}")
    print(f"model: random_forest with {DEFAULTS['random_forest']}")
    print(
        "\nThe model server keeps running. Inspect and stop it with:\n"
        f"  .venv/bin/ctcd models list\n"
        f"  .venv/bin/ctcd models describe {service.uuid[:8]}\n"
        f"  .venv/bin/ctcd models logs {service.uuid[:8]} --tail 20\n"
        f"  .venv/bin/ctcd models stop {service.uuid[:8]}\n"
        "Try it yourself (the model's own input example, 5 rows):\n"
        f"  curl -s {service.prediction_url} -H 'Content-Type: application/json' "
        f"-d @{service.local.runtime_dir}/models/{service.model_version}/serving_input_example.json"
    )
