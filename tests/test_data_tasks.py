"""ingest_data, validate_data and clean_data, called as plain functions (`task.fn`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctcd import exceptions as exc
from ctcd.sample import FEATURES, generate
from flows.data import DROPPED, Dataset, clean_data, ingest_data, validate_data

pytestmark = pytest.mark.unit


def _dataset(frame: pd.DataFrame, source: str = "t.csv") -> Dataset:
    return Dataset(frame=frame, source=source, sha256="0" * 64)


def test_sample_is_deterministic_olist_shaped_and_skewed_to_five() -> None:
    a, b = generate(3_000, seed=1), generate(3_000, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert {*FEATURES, "review_score", "order_purchase_timestamp", "review_comment_message"} <= set(
        a
    )
    shares = a["review_score"].value_counts(normalize=True)
    assert shares.idxmax() == 5 and 0.5 < shares[5] < 0.65
    assert set(a["review_score"]) == {1, 2, 3, 4, 5}
    assert a["product_weight_g"].isna().sum() > 0  # a few missing product sizes


def test_ingest_reads_csv_and_parquet_with_content_hash(small_table, tmp_path: Path) -> None:
    csv, parquet = tmp_path / "t.csv", tmp_path / "t.parquet"
    small_table.to_csv(csv, index=False)
    small_table.to_parquet(parquet, index=False)
    from_csv, from_parquet = ingest_data.fn(str(csv)), ingest_data.fn(str(parquet))
    assert len(from_csv.frame) == len(from_parquet.frame) == len(small_table)
    assert from_csv.source == str(csv.resolve())
    assert len(from_csv.sha256) == 64 and from_csv.sha256 != from_parquet.sha256


def test_changed_file_at_same_path_gets_a_new_hash(small_table, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    small_table.to_csv(path, index=False)
    before = ingest_data.fn(str(path)).sha256
    changed = small_table.copy()
    changed.loc[len(changed) - 1, "price"] += 1  # one value in the last row
    changed.to_csv(path, index=False)
    assert ingest_data.fn(str(path)).sha256 != before


def test_ingest_without_path_uses_the_generated_sample(ctcd_home: Path) -> None:
    dataset = ingest_data.fn(None)
    assert len(dataset.frame) == 115_609
    assert Path(dataset.source).parent == ctcd_home / "data"


@pytest.mark.parametrize(
    ("content", "error", "words"),
    [
        (None, exc.DataFileNotFoundError, "does not exist"),
        (b"", exc.EmptyDataError, "is empty"),
        (b"\n\n\n", exc.EmptyDataError, "is empty"),
        (bytes(range(256)) * 40, exc.UnreadableDataError, "cannot be read"),
    ],
    ids=["missing", "empty", "blank-lines", "binary"],
)
def test_unusable_files_fail_with_the_file_named(tmp_path: Path, content, error, words) -> None:
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=words) as info:
        ingest_data.fn(str(path))
    assert str(path) in str(info.value)


def test_garbage_parquet_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(exc.UnreadableDataError, match="bad.parquet"):
        ingest_data.fn(str(path))


def test_valid_table_passes_and_yields_the_twelve_features(small_table) -> None:
    assert validate_data.fn(_dataset(small_table)) == FEATURES


def test_missing_target_names_column_and_what_to_do(small_table) -> None:
    with pytest.raises(exc.MissingTargetError, match=r"'score' is not in 't.csv'.*target="):
        validate_data.fn(_dataset(small_table), target="score")


def test_non_numeric_target_is_refused(small_table) -> None:
    with pytest.raises(exc.NonNumericTargetError, match="'customer_city'.*not numeric"):
        validate_data.fn(_dataset(small_table), target="customer_city")


def test_too_few_rows(small_table) -> None:
    with pytest.raises(exc.TooFewRowsError, match="has 12 usable rows; at least 30"):
        validate_data.fn(_dataset(small_table.head(12)))


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("review_score", 7, "review_score must be 1-5"),
        ("price", -3.0, "greater_than_or_equal_to"),
        ("review_score", np.nan, "not_nullable"),
    ],
)
def test_contract_violations_are_listed(small_table, column, value, words) -> None:
    frame = small_table.copy()
    frame.loc[5, column] = value
    with pytest.raises(exc.DataContractError, match=words) as info:
        validate_data.fn(_dataset(frame))
    assert f"column '{column}'" in str(info.value)


def test_all_empty_feature_is_refused(small_table) -> None:
    frame = small_table.assign(product_photos_qty=np.nan)
    with pytest.raises(exc.DataContractError, match="product_photos_qty.*entirely empty"):
        validate_data.fn(_dataset(frame))


def test_missing_known_column_for_customer_satisfaction(small_table) -> None:
    with pytest.raises(exc.DataContractError, match="missing column.*freight_value"):
        validate_data.fn(_dataset(small_table.drop(columns="freight_value")))


def test_any_numeric_table_works_with_the_generic_contract() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.random(100), "b": rng.random(100), "label": ["x"] * 100})
    frame["y"] = frame["a"] * 3
    assert validate_data.fn(_dataset(frame), target="y") == ["a", "b"]


def test_clean_drops_timestamps_ids_and_text_and_splits_80_20(small_table) -> None:
    data = clean_data.fn(_dataset(small_table))
    assert data.features == FEATURES
    assert not set(DROPPED) & set(data.x_train)
    assert len(data.x_train) == 1_600 and len(data.x_test) == 400
    assert data.x_train[["product_weight_g", "product_width_cm"]].notna().all().all()
    again = clean_data.fn(_dataset(small_table))
    assert list(again.x_test.index) == list(data.x_test.index)  # seed 42
