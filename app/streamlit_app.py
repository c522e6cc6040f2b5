"""ctcd's Streamlit app: ask the deployed model for customer-satisfaction scores, one order
or a CSV of them, and see how the model was evaluated.

    make app                                   # http://127.0.0.1:8501
    make app ARGS="--model NAME --deployer seldon-model-deployer/prod"

The server is looked up through `find_service` on every page load, so a new version
deployed while the page is open answers the next request, and the page says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import pandas as pd
import streamlit as st

from app import model_data as md
from app.connection import Connection, connect, predict
from blocks.service import ServiceRecord
from ctcd.exceptions import PredictionError
from ctcd.reference import Reference, load_reference
from ctcd.settings import tracking_uri

DEFAULT_MODEL = "customer-satisfaction"


def _options() -> argparse.Namespace:
    """`-- --model NAME --deployer NAME` after `streamlit run`, else CTCD_APP_* variables."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default=os.environ.get("CTCD_APP_MODEL", DEFAULT_MODEL))
    parser.add_argument("--deployer", default=os.environ.get("CTCD_APP_DEPLOYER", ""))
    return parser.parse_known_args(sys.argv[1:])[0]


@st.cache_data(show_spinner=False)
def _reference(model_name: str, version: str, uri: str) -> Reference:
    return load_reference(model_name, version)


@st.cache_data(show_spinner=False)
def _images(run_id: str, uri: str) -> tuple[dict[str, bytes], str | None]:
    return md.evaluation_images(run_id)


def _sidebar(options: argparse.Namespace) -> tuple[str, str | None]:
    st.sidebar.header("Model server")
    model = st.sidebar.text_input("Model", value=options.model, key="model").strip()
    deployer = st.sidebar.text_input(
        "Deployer",
        value=options.deployer,
        key="deployer",
        help="A saved deployer block, e.g. `seldon-model-deployer/prod`; "
        "empty: the local MLflow deployer.",
    ).strip()
    return model or DEFAULT_MODEL, deployer or None


def _header(connection: Connection, deployer: str | None) -> None:
    service = connection.service
    if service is None:
        st.warning(connection.problem)
        return
    since = service.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    st.markdown(
        f"Talking to **{service.model_name}** version **{service.model_version}** at "
        f"`{service.prediction_url}`, serving since {since} "
        f"({service.backend}, server `{service.uuid[:8]}`"
        + (f", deployer `{deployer}`)" if deployer else ")")
    )
    if service.rollout is not None:
        rollout, short = service.rollout, service.uuid[:8]
        who = (
            f"Version {rollout.candidate_version} answers {rollout.percent:g} % of requests"
            if rollout.mode == "canary"
            else f"Version {rollout.candidate_version} scores copies of requests (shadow); "
            f"answers come from version {rollout.champion_version}"
        )
        st.info(
            f"Rollout open: {rollout.describe()}. {who}. `rollout-analysis` promotes or rolls "
            f"it back on live evidence; `ctcd models rollout status {short}` shows it."
        )


def _feature_input(feature: md.FeatureRange) -> None:
    key = f"feature:{feature.name}"
    number: Any = int if feature.integer else float
    low, high = number(feature.low), number(feature.high)
    current = st.session_state.get(key, feature.default)
    st.session_state[key] = number(min(max(current, low), high))  # ranges change with versions
    st.number_input(
        feature.name,
        min_value=low,
        max_value=high,
        step=1 if feature.integer else None,
        key=key,
        help=f"{low:g} to {high:g} in the training sample; default: its median {feature.default:g}",
    )


def _single(service: ServiceRecord, reference: Reference) -> None:
    st.caption(
        f"Inputs range over the {reference.rows:,}-row training sample stored with version "
        f"{service.model_version}; each starts at its median."
    )
    with st.form("single"):
        columns = st.columns(3)
        for i, feature in enumerate(md.feature_ranges(reference)):
            with columns[i % 3]:
                _feature_input(feature)
        submitted = st.form_submit_button("Predict", type="primary")
    if not submitted:
        return
    row = pd.DataFrame([{n: st.session_state[f"feature:{n}"] for n in reference.names}])
    try:
        score = predict(service, row.astype(reference.dtypes))[0]
    except PredictionError as err:
        st.error(str(err))
        return
    st.session_state["prediction"] = {"score": score, "version": service.model_version}
    st.metric(f"Predicted {reference.target}", f"{score:.2f}")
    st.caption(f"answered by version {service.model_version} at {service.prediction_url}")


def _read_csv(upload: Any) -> pd.DataFrame | None:
    try:
        return pd.read_csv(upload)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        st.error(f"'{upload.name}' cannot be read as a CSV file with a header row: {err}")
        return None


def _batch(service: ServiceRecord, reference: Reference) -> None:
    upload = st.file_uploader("A CSV file with the feature columns", type=["csv"])
    st.caption("Columns: " + ", ".join(f"`{n}`" for n in reference.names))
    if upload is None:
        return
    frame = _read_csv(upload)
    if frame is None:
        return
    missing, unexpected = md.check_columns(list(frame.columns), reference.names, reference.target)
    if missing or unexpected:
        found = [f"missing columns: {', '.join(missing)}"] if missing else []
        found += [f"unexpected columns: {', '.join(unexpected)}"] if unexpected else []
        st.error(
            f"'{upload.name}' does not match the features of version {service.model_version} "
            f"({'; '.join(found)}). Give it exactly these columns (the target "
            f"`{reference.target}` may stay): {', '.join(reference.names)}."
        )
        return
    features, problems = md.conform(frame, reference)
    if problems:
        st.error(f"'{upload.name}': " + "; ".join(problems) + ".")
        return
    try:
        scores = predict(service, features)
    except PredictionError as err:
        st.error(str(err))
        return
    result = frame.assign(**{f"predicted_{reference.target}": scores})
    st.dataframe(result, hide_index=True)
    st.download_button(
        "Download predictions (CSV)",
        result.to_csv(index=False).encode(),
        file_name=f"predictions_v{service.model_version}.csv",
        mime="text/csv",
    )


def _model(model_name: str, served: str | None) -> None:
    table = md.versions_table(model_name, served)
    if table.empty:
        st.info(f"No versions of '{model_name}' are registered in MLflow at {tracking_uri()}.")
        return
    champion = md.champion_version(model_name)
    st.subheader("Versions")
    st.caption("Metrics on each version's held-out 20 %; the gate's decision when it ran.")
    st.dataframe(table, hide_index=True)
    shown = served or champion or str(table["version"].iloc[0])
    role = "serving" if shown == served else "champion" if shown == champion else "newest"
    st.subheader(f"Evaluation of version {shown} ({role})")
    images, importance = _images(md.run_of(model_name, shown), tracking_uri())
    if not images:
        st.info(f"Version {shown} was logged without evaluation plots.")
    for name, png in images.items():
        st.image(png, caption=name.removesuffix(".png").replace("_", " "))
    if importance:
        st.caption(f"Feature importance: {importance}.")


def main() -> None:
    st.set_page_config(page_title="ctcd: customer satisfaction", layout="wide")
    model_name, deployer = _sidebar(_options())
    st.title(f"ctcd · {model_name}")
    connection = connect(model_name, deployer)
    _header(connection, deployer)
    service = connection.service
    single, batch, model = st.tabs(["Single prediction", "Batch", "Model"])
    reference = None
    if service is not None:
        reference = _reference(model_name, service.model_version, tracking_uri())
    for tab, show in ((single, _single), (batch, _batch)):
        with tab:
            if service is None or reference is None:
                st.info("No server to ask: see the message above.")
            else:
                _guarded(show, service, reference)
    with model:
        _guarded(_model, model_name, service.model_version if service else None)


def _guarded(section: Any, *args: Any) -> None:
    """Show an error as a message that names it, never as a traceback."""
    try:
        section(*args)
    except Exception as err:
        st.error(f"{type(err).__name__}: {err}")


try:
    main()
except Exception as err:  # the page shows what went wrong, never a traceback
    st.error(f"The app could not load: {type(err).__name__}: {err}")
