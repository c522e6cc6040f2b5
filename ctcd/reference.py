"""A model version's reference: the sample of its training rows stored with its MLflow run
(`ctcd.names.REFERENCE_PATH`), with the target and the features it was trained on. The drift
monitor compares new data with it; the app takes input ranges and defaults from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ctcd.names import CHAMPION, REFERENCE_PATH


@dataclass(frozen=True)
class Reference:
    model_name: str
    model_version: str
    frame: pd.DataFrame = field(repr=False)
    target: str = "review_score"
    run_id: str = ""
    # The features in training order (default: every column of `frame` but the target).
    feature_names: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return list(self.feature_names) or [c for c in self.frame.columns if c != self.target]

    @property
    def rows(self) -> int:
        return len(self.frame)

    @property
    def dtypes(self) -> dict[str, str]:
        return {name: str(self.frame[name].dtype) for name in self.names}


def load_reference(model_name: str, version: str | None = None, alias: str = CHAMPION) -> Reference:
    """The reference of `version`, or of the version holding `alias` (default `champion`),
    from the tracking server MLflow is configured for."""
    import mlflow

    from ctcd.settings import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    found = (
        client.get_model_version(model_name, version)
        if version is not None
        else client.get_model_version_by_alias(model_name, alias)
    )
    run_id = str(found.run_id)
    params = client.get_run(run_id).data.params
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=REFERENCE_PATH, tracking_uri=tracking_uri()
    )
    features = params.get("features")
    return Reference(
        model_name=model_name,
        model_version=str(found.version),
        frame=pd.read_parquet(path),
        target=params.get("target", "review_score"),
        run_id=run_id,
        feature_names=tuple(features.split(",")) if features else (),
    )
