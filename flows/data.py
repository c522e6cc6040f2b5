"""Data tasks: ingest a table, check it against its data contract, clean and split it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pyarrow import ArrowException
from sklearn.model_selection import train_test_split

from ctcd import exceptions as exc
from ctcd.sample import FEATURES, TARGET, sample_path

MIN_ROWS = 30
SPLIT_SEED = 42
TEST_SIZE = 0.2
# Columns ZenML's customer-satisfaction cleaning drops before keeping the numeric ones.
DROPPED = [
    "order_approved_at",
    "order_delivered_carrier_date",
    "order_delivered_customer_date",
    "order_estimated_delivery_date",
    "order_purchase_timestamp",
    "customer_zip_code_prefix",
    "order_item_id",
]
PRODUCT_SIZES = ["product_weight_g", "product_length_cm", "product_height_cm", "product_width_cm"]
Contract = Literal["auto", "generic", "customer_satisfaction"]


@dataclass(frozen=True)
class Dataset:
    """A loaded table and where it came from; `sha256` is the file's content hash."""

    frame: pd.DataFrame = field(repr=False)
    source: str
    sha256: str


@dataclass(frozen=True)
class CleanData:
    features: list[str]
    x_train: pd.DataFrame = field(repr=False)
    x_test: pd.DataFrame = field(repr=False)
    y_train: pd.Series = field(repr=False)
    y_test: pd.Series = field(repr=False)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV or Parquet (by suffix), turning every failure into a `DataError`."""
    if not path.is_file():
        raise exc.DataFileNotFoundError(str(path))
    if path.stat().st_size == 0:
        raise exc.EmptyDataError(str(path))
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise exc.EmptyDataError(str(path)) from err
    except (UnicodeDecodeError, pd.errors.ParserError, ArrowException, OSError) as err:
        raise exc.UnreadableDataError(str(path), f"{type(err).__name__}: {err}"[:200]) from err


@task(cache_policy=NO_CACHE)
def ingest_data(data_path: str | None = None) -> Dataset:
    """Load the table at `data_path` (CSV or Parquet), or the generated sample when None.

    The content hash keys everything downstream, so a changed file at the same path is
    never mistaken for the old one.
    """
    path = Path(data_path).expanduser() if data_path else sample_path()
    frame = read_table(path)
    return Dataset(frame=frame, source=str(path.resolve()), sha256=file_sha256(path))


def resolve_contract(target: str, contract: Contract) -> Contract:
    if contract == "auto":
        return "customer_satisfaction" if target == TARGET else "generic"
    return contract


def _schema(frame: pd.DataFrame, target: str, contract: Contract) -> pa.DataFrameSchema:
    not_empty = pa.Check(lambda s: s.notna().any(), error="column is entirely empty")
    columns: dict[str, pa.Column] = {
        name: pa.Column(nullable=True, checks=not_empty)
        for name in frame.select_dtypes("number").columns
        if name != target
    }
    target_checks = [pa.Check(lambda s: np.isfinite(s), error="target must be finite")]
    if contract == "customer_satisfaction":
        target_checks.append(pa.Check.isin([1, 2, 3, 4, 5], error="review_score must be 1-5"))
        for name in FEATURES:
            columns[name] = pa.Column(float, nullable=True, coerce=True, checks=not_empty)
        for name in ("price", "freight_value", "payment_value"):
            columns[name] = pa.Column(
                float, nullable=True, coerce=True, checks=[not_empty, pa.Check.ge(0)]
            )
    columns[target] = pa.Column(nullable=False, checks=target_checks)
    return pa.DataFrameSchema(columns, strict=False)


def _problems(err: pa.errors.SchemaErrors) -> list[str]:
    cases = err.failure_cases
    problems = []
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        examples = ", ".join(repr(v) for v in group["failure_case"].head(3))
        where = f"column '{column}'" if isinstance(column, str) else "table"
        problems.append(f"{where}: {check} ({len(group)} failing value(s), e.g. {examples})")
    return problems


@task(cache_policy=NO_CACHE)
def validate_data(dataset: Dataset, target: str = TARGET, contract: Contract = "auto") -> list[str]:
    """Check the table against its data contract before any training; return the features.

    Always: the target exists, is numeric and has no missing values; there are enough rows
    to split; no numeric feature is entirely empty. For the customer-satisfaction table
    (`contract="auto"` with target `review_score`): its 12 known feature columns are present,
    scores are 1-5 and prices, freight and payment values are non-negative.
    """
    frame, source = dataset.frame, dataset.source
    if target not in frame.columns:
        raise exc.MissingTargetError(source, target, frame.columns)
    column = frame[target]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        example = column.dropna().iloc[0] if column.notna().any() else None
        raise exc.NonNumericTargetError(source, target, str(column.dtype), example)
    if len(frame) < MIN_ROWS:
        raise exc.TooFewRowsError(source, len(frame), MIN_ROWS)
    kind = resolve_contract(target, contract)
    if kind == "customer_satisfaction" and (missing := [c for c in FEATURES if c not in frame]):
        raise exc.DataContractError(source, [f"missing column(s): {', '.join(missing)}"])
    try:
        _schema(frame, target, kind).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as err:
        raise exc.DataContractError(source, _problems(err)) from err
    return [c for c in frame.select_dtypes("number").columns if c != target and c not in DROPPED]


def feature_frame(frame: pd.DataFrame, target: str) -> pd.DataFrame:
    """The cleaning rules without the split: numeric columns but timestamps, ids and the
    target, missing product sizes filled with the column median. Inference uses it too."""
    frame = frame.drop(columns=[c for c in [*DROPPED, target] if c in frame.columns])
    frame = frame.select_dtypes("number").astype("float64")
    for name in PRODUCT_SIZES:
        if name in frame:
            frame[name] = frame[name].fillna(frame[name].median())
    return frame


@task(cache_policy=NO_CACHE)
def clean_data(dataset: Dataset, target: str = TARGET) -> CleanData:
    """Drop timestamps and id-like columns, fill missing product sizes with the median,
    keep numeric columns and split 80/20 with seed 42. Other missing feature values are
    left to the model pipeline's imputer, so serving handles them the same way."""
    features = feature_frame(dataset.frame, target)
    x_train, x_test, y_train, y_test = train_test_split(
        features, dataset.frame[target], test_size=TEST_SIZE, random_state=SPLIT_SEED
    )
    return CleanData(list(features.columns), x_train, x_test, y_train, y_test)
