"""A deterministic, synthetic table shaped like ZenML's customer-satisfaction (Olist) data.

The real pre-joined Olist table is not shipped. This generates the same columns (ids,
`order_*` timestamps, payment, product and review fields, review text) with realistic
distributions: prices and weights log-normal, a few missing product sizes and
`review_score` from 1 to 5 skewed towards 5 (about 58 % fives, as in the real table).
The score depends on delivery, freight and product fields plus noise, so models have
something to learn. It is synthetic: do not read business conclusions into it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctcd.settings import ctcd_home

DEFAULT_ROWS = 115_609
SEED = 42
TARGET = "review_score"
FEATURES = [
    "payment_sequential",
    "payment_installments",
    "payment_value",
    "price",
    "freight_value",
    "product_name_lenght",
    "product_description_lenght",
    "product_photos_qty",
    "product_weight_g",
    "product_length_cm",
    "product_height_cm",
    "product_width_cm",
]
# Share of each score in the real table, 1 to 5.
SCORE_SHARES = [0.115, 0.032, 0.083, 0.193, 0.577]
CATEGORIES = {
    "cama_mesa_banho": "bed_bath_table",
    "beleza_saude": "health_beauty",
    "esporte_lazer": "sports_leisure",
    "moveis_decoracao": "furniture_decor",
    "informatica_acessorios": "computers_accessories",
    "utilidades_domesticas": "housewares",
    "relogios_presentes": "watches_gifts",
    "telefonia": "telephony",
}
STATES = ["SP", "RJ", "MG", "RS", "PR", "SC", "BA", "DF", "GO", "ES"]
CITIES = ["sao paulo", "rio de janeiro", "belo horizonte", "porto alegre", "curitiba"]


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    hi = rng.integers(0, 2**63, n, dtype=np.int64)
    lo = rng.integers(0, 2**63, n, dtype=np.int64)
    return np.array([f"{a:016x}{b:016x}" for a, b in zip(hi, lo, strict=True)])


def _stamps(start: pd.Series, hours: np.ndarray) -> pd.Series:
    stamps: pd.Series = (start + pd.to_timedelta(hours, unit="h")).dt.strftime("%Y-%m-%d %H:%M:%S")
    return stamps


def generate(n_rows: int = DEFAULT_ROWS, seed: int = SEED) -> pd.DataFrame:
    """The synthetic table: same seed and size, same rows."""
    rng = np.random.default_rng(seed)
    n = n_rows
    purchase = pd.Series(
        pd.Timestamp("2017-01-01") + pd.to_timedelta(rng.uniform(0, 600 * 24, n), unit="h")
    )
    promised_days = rng.integers(10, 40, n)
    delivery_days = np.clip(rng.gamma(2.5, 4.5, n), 1, 120)
    late_days = delivery_days - promised_days
    price = np.round(np.exp(rng.normal(4.3, 0.9, n)), 2)
    weight = np.round(np.exp(rng.normal(6.6, 1.2, n)))
    freight = np.round(4 + 0.0015 * weight + 0.03 * price + rng.gamma(2, 3, n), 2)
    installments = np.clip(np.round(price / rng.uniform(40, 200, n)), 1, 10).astype(int)
    photos = rng.integers(1, 10, n).astype(float)
    desc_len = np.round(np.exp(rng.normal(6.4, 0.7, n)))
    name_len = rng.integers(10, 70, n).astype(float)
    length = np.round(np.clip(rng.normal(30, 15, n), 7, 105))
    height = np.round(np.clip(rng.normal(16, 12, n), 2, 105))
    width = np.round(np.clip(rng.normal(23, 11, n), 6, 118))
    sequential = np.where(rng.random(n) < 0.95, 1, rng.integers(2, 6, n))
    payment = np.round(price + freight, 2) * np.where(sequential > 1, 0.5, 1.0)

    latent = (
        -0.5 * np.tanh(late_days / 6.0)
        - 1.2 * np.clip(freight / (price + 1.0), 0, 2)
        + 0.05 * photos
        + 0.15 * np.log(desc_len / 600.0)
        - 0.25 * (installments > 6)
        - 0.2 * (weight > 5000)
        + rng.normal(0, 0.3, n)
    )
    cuts = np.quantile(latent, np.cumsum(SCORE_SHARES)[:-1])
    score = 1 + np.searchsorted(cuts, latent)

    cat_pt = rng.choice(list(CATEGORIES), n)
    missing_size = rng.random(n) < 0.002
    missing_text = rng.random(n) < 0.014
    frame = pd.DataFrame(
        {
            "order_id": _ids(rng, n),
            "customer_id": _ids(rng, n),
            "order_status": np.where(rng.random(n) < 0.97, "delivered", "shipped"),
            "order_purchase_timestamp": purchase.dt.strftime("%Y-%m-%d %H:%M:%S"),
            "order_approved_at": _stamps(purchase, rng.uniform(0.2, 30, n)),
            "order_delivered_carrier_date": _stamps(purchase, rng.uniform(24, 120, n)),
            "order_delivered_customer_date": _stamps(purchase, delivery_days * 24),
            "order_estimated_delivery_date": _stamps(purchase, promised_days * 24.0),
            "payment_sequential": sequential,
            "payment_type": rng.choice(
                ["credit_card", "boleto", "voucher", "debit_card"], n, p=[0.74, 0.19, 0.05, 0.02]
            ),
            "payment_installments": installments,
            "payment_value": np.round(payment, 2),
            "customer_unique_id": _ids(rng, n),
            "customer_zip_code_prefix": rng.integers(1000, 99990, n),
            "customer_city": rng.choice(CITIES, n),
            "customer_state": rng.choice(STATES, n),
            "order_item_id": np.where(rng.random(n) < 0.9, 1, rng.integers(2, 4, n)),
            "product_id": _ids(rng, n),
            "seller_id": _ids(rng, n),
            "shipping_limit_date": _stamps(purchase, rng.uniform(48, 200, n)),
            "price": price,
            "freight_value": freight,
            "product_category_name": cat_pt,
            "product_name_lenght": np.where(missing_text, np.nan, name_len),
            "product_description_lenght": np.where(missing_text, np.nan, desc_len),
            "product_photos_qty": np.where(missing_text, np.nan, photos),
            "product_weight_g": np.where(missing_size, np.nan, weight),
            "product_length_cm": np.where(missing_size, np.nan, length),
            "product_height_cm": np.where(missing_size, np.nan, height),
            "product_width_cm": np.where(missing_size, np.nan, width),
            "product_category_name_english": pd.Series(cat_pt).map(CATEGORIES).to_numpy(),
            "review_id": _ids(rng, n),
            "review_score": score.astype(int),
            "review_comment_title": pd.Series(["recomendo"] * n).where(rng.random(n) < 0.12),
            "review_comment_message": pd.Series(
                np.where(score >= 4, "chegou no prazo", "não recebi")
            ).where(rng.random(n) < 0.41),
            "review_creation_date": _stamps(purchase, delivery_days * 24 + 24),
            "review_answer_timestamp": _stamps(purchase, delivery_days * 24 + 72),
        }
    )
    return frame


def sample_path(n_rows: int = DEFAULT_ROWS, seed: int = SEED) -> Path:
    """The generated sample as a Parquet file in `CTCD_HOME/data`, written on first use."""
    path = ctcd_home() / "data" / f"customer_satisfaction_synthetic_{n_rows}_{seed}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        generate(n_rows, seed).to_parquet(tmp, index=False)
        tmp.replace(path)
    return path
