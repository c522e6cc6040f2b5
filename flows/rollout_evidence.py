"""The live evidence on an open rollout, and the decision it supports (no side effects).

Evidence comes from the server's prediction log since the rollout opened (`role` tells the
champion's answers from the candidate's) and its workers' counts of answers and failures:

- failures: the share of requests each model answered with an error status. The candidate's
  rate above the champion's by more than `max_failure_rate` rolls it back.
- latency: each model's p99 (from a request's arrival to its answer). The candidate's above
  `max_latency_ratio` times the champion's rolls it back.
- outputs: the two-sample Kolmogorov-Smirnov statistic between the candidate's predictions and
  the champion's (in shadow mode on the very same requests). Without outcomes, above
  `max_output_shift` rolls it back: nothing says its different answers are the right ones.
  With outcomes it is reported, and the labels decide (a better model may answer differently).
- outcomes (labels joined by request id, when a table of them is given): each model's live
  mean absolute error. In shadow mode both scored the same rows, so the comparison is paired
  (Wilcoxon signed-rank test on the per-row differences of absolute error); in canary mode the
  rows differ (Mann-Whitney U test on the absolute errors). A candidate worse with p < `alpha`
  is rolled back; one at least as good (its mean error not above the champion's) is promoted;
  worse but not significantly so waits for more evidence.

Too little evidence (fewer than `min_requests` candidate answers, or `min_outcomes` labelled
rows when outcomes are expected) waits, until `max_duration` has passed since the rollout
opened: then it rolls back, saying so.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from ctcd.rollout import OpenRollout

Decision = Literal["promote", "rollback", "wait"]


class Criteria(BaseModel):
    """When live evidence is enough, and what it must show."""

    min_requests: int = Field(default=200, ge=1, description="Candidate answers needed.")
    min_outcomes: int = Field(
        default=100, ge=0, description="Labelled rows per model needed when outcomes are given."
    )
    max_duration_s: float = Field(
        default=7200, gt=0, description="Seconds a rollout may wait for evidence; then rollback."
    )
    max_failure_rate: float = Field(
        default=0.01, ge=0, description="Candidate failure rate allowed above the champion's."
    )
    max_latency_ratio: float = Field(default=2.0, gt=0, description="Candidate p99 / champion's.")
    max_output_shift: float = Field(
        default=0.5, gt=0, le=1, description="Largest KS statistic between the two outputs."
    )
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance of a difference.")


class Evidence(BaseModel):
    """What was seen since the rollout opened, per role (`champion`, and `canary`/`shadow`)."""

    requests: dict[str, int] = Field(default_factory=dict)
    failures: dict[str, int] = Field(default_factory=dict)
    skipped: int = Field(default=0, description="Shadow copies not scored (too many at once).")
    logged_rows: dict[str, int] = Field(default_factory=dict)
    latency_p99_ms: dict[str, float | None] = Field(default_factory=dict)
    output_shift: float | None = None
    outcomes: dict[str, int] = Field(default_factory=dict)
    live_mae: dict[str, float] = Field(default_factory=dict)
    test: str | None = None
    p_value: float | None = None
    source: str = "prediction log"

    def failure_rate(self, role: str) -> float:
        asked = self.requests.get(role, 0)
        return self.failures.get(role, 0) / asked if asked else 0.0

    def summary(self) -> str:
        parts = [
            f"{role}: {self.requests.get(role, 0)} requests, {self.failures.get(role, 0)} "
            f"failed, p99 {_ms(self.latency_p99_ms.get(role))}"
            for role in self.requests
        ]
        if self.skipped:
            parts.append(f"{self.skipped} shadow copies skipped (too many in flight)")
        if self.output_shift is not None:
            parts.append(f"output shift (KS) {self.output_shift:.3f}")
        if self.live_mae:
            errors = ", ".join(
                f"{role} {mae:.4f} on {self.outcomes.get(role, 0)} rows"
                for role, mae in self.live_mae.items()
            )
            parts.append(f"live MAE {errors}")
        if self.p_value is not None:
            parts.append(f"{self.test}: p = {self.p_value:.4g}")
        return "; ".join(parts)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def gather(
    rollout: OpenRollout,
    log: pd.DataFrame,
    stats: list[dict[str, Any]],
    outcomes: pd.DataFrame | None,
    target: str,
) -> Evidence:
    """The evidence in the log rows and stats files since `rollout` opened."""
    role = rollout.role
    evidence = Evidence()
    versions = {"champion": rollout.champion_version, role: rollout.candidate_version}
    for name, version in versions.items():
        counted = [
            s for s in stats
            if s.get("role", "champion") == name and str(s.get("model_version")) == version
            and float(s.get("started") or 0) >= rollout.since - 1
        ]  # fmt: skip
        evidence.requests[name] = sum(int(s.get("requests") or 0) for s in counted)
        evidence.failures[name] = sum(int(s.get("failures") or 0) for s in counted)
        evidence.skipped += sum(int(s.get("skipped") or 0) for s in counted)
    rows = _rows(log, rollout)
    for label, part in rows.items():
        evidence.logged_rows[label] = len(part)
        per_request = part.drop_duplicates("request_id")["latency_ms"].dropna()
        evidence.latency_p99_ms[label] = (
            float(np.percentile(per_request, 99)) if len(per_request) else None
        )
    champion, candidate = rows["champion"], rows[role]
    if len(champion) and len(candidate):
        evidence.output_shift = _ks(champion, candidate, rollout.mode == "shadow")
    if outcomes is not None:
        _outcomes(evidence, rollout, champion, candidate, outcomes, target)
    return evidence


def _rows(log: pd.DataFrame, rollout: OpenRollout) -> dict[str, pd.DataFrame]:
    """The log's rows of each model since the rollout opened."""
    empty = pd.DataFrame(columns=["request_id", "row", "prediction", "latency_ms"])
    if log.empty:
        return {"champion": empty, rollout.role: empty}
    since = pd.Timestamp(rollout.since, unit="s", tz="UTC")
    log = log[log["ts"] >= since]
    version = log["model_version"].astype(str)
    if "latency_ms" not in log:
        log = log.assign(latency_ms=np.nan)
    return {
        "champion": log[(log["role"] == "champion") & (version == rollout.champion_version)],
        rollout.role: log[(log["role"] == rollout.role) & (version == rollout.candidate_version)],
    }


def _ks(champion: pd.DataFrame, candidate: pd.DataFrame, paired: bool) -> float:
    from scipy.stats import ks_2samp

    if paired:  # the same requests: compare on the rows both answered
        both = champion.merge(candidate, on=["request_id", "row"], suffixes=("", "_c"))
        if both.empty:
            return 0.0
        return float(ks_2samp(both["prediction"], both["prediction_c"]).statistic)
    return float(ks_2samp(champion["prediction"], candidate["prediction"]).statistic)


def _outcomes(
    evidence: Evidence,
    rollout: OpenRollout,
    champion: pd.DataFrame,
    candidate: pd.DataFrame,
    outcomes: pd.DataFrame,
    target: str,
) -> None:
    """Live errors of both on the labelled rows, and whether they differ (see the module)."""
    from scipy.stats import mannwhitneyu, wilcoxon

    labels = outcomes.dropna(subset=[target]).assign(
        request_id=lambda f: f["request_id"].astype(str)
    )
    on = ["request_id", "row"] if "row" in labels else ["request_id"]
    labels = labels.drop_duplicates(subset=on, keep="last")[[*on, target]]
    errors = {}
    for label, part in (("champion", champion), (rollout.role, candidate)):
        joined = part.merge(labels, on=on, how="inner")
        joined = joined.assign(error=(joined["prediction"] - joined[target]).abs())
        errors[label] = joined
        evidence.outcomes[label] = len(joined)
        if len(joined):
            evidence.live_mae[label] = float(joined["error"].mean())
    first, second = errors["champion"], errors[rollout.role]
    if rollout.mode == "shadow":
        both = first.merge(second, on=["request_id", "row"], suffixes=("", "_c"))
        differences = both["error_c"] - both["error"]
        if len(both) >= 10 and differences.abs().sum() > 0:
            evidence.test = f"Wilcoxon signed-rank, paired on {len(both)} rows"
            evidence.p_value = float(wilcoxon(differences).pvalue)
    elif len(first) >= 10 and len(second) >= 10:
        evidence.test = f"Mann-Whitney U on {len(first)} and {len(second)} rows"
        evidence.p_value = float(mannwhitneyu(first["error"], second["error"]).pvalue)


def decide(
    rollout: OpenRollout,
    evidence: Evidence,
    criteria: Criteria,
    with_outcomes: bool,
    now: float | None = None,
) -> tuple[Decision, str]:
    """promote, rollback or wait, and why (see the module docstring)."""
    role = rollout.role
    elapsed = (now or time.time()) - rollout.since
    overdue = elapsed > criteria.max_duration_s
    excess = evidence.failure_rate(role) - evidence.failure_rate("champion")
    if evidence.failures.get(role, 0) >= 5 and excess > criteria.max_failure_rate:
        return "rollback", (
            f"the candidate failed {evidence.failures[role]} of {evidence.requests[role]} "
            f"requests ({evidence.failure_rate(role):.1%}, the champion "
            f"{evidence.failure_rate('champion'):.1%}; at most "
            f"{criteria.max_failure_rate:.1%} more is allowed)"
        )
    if evidence.requests.get(role, 0) < criteria.min_requests:
        return _wait_or_expire(
            f"{evidence.requests.get(role, 0)} of {criteria.min_requests} candidate requests",
            overdue, elapsed,
        )  # fmt: skip
    p99, base = evidence.latency_p99_ms.get(role), evidence.latency_p99_ms.get("champion")
    if p99 is not None and base is not None and p99 > criteria.max_latency_ratio * base:
        return "rollback", (
            f"the candidate's p99 latency {p99:.1f} ms is over {criteria.max_latency_ratio:g}x "
            f"the champion's {base:.1f} ms"
        )
    if not with_outcomes:
        shift = evidence.output_shift
        if shift is not None and shift > criteria.max_output_shift:
            return "rollback", (
                f"the candidate's outputs differ from the champion's (KS {shift:.3f} > "
                f"{criteria.max_output_shift:g}) and no outcomes say which is right"
            )
        return "promote", "guardrails passed (no outcomes given: failures, latency, outputs only)"
    labelled = min(evidence.outcomes.get(role, 0), evidence.outcomes.get("champion", 0))
    if labelled < criteria.min_outcomes:
        return _wait_or_expire(
            f"{labelled} of {criteria.min_outcomes} labelled rows per model", overdue, elapsed
        )
    mae, base_mae = evidence.live_mae[role], evidence.live_mae["champion"]
    significant = evidence.p_value is not None and evidence.p_value < criteria.alpha
    how = f"live MAE {mae:.4f} vs the champion's {base_mae:.4f} ({evidence.test}, p = "
    how += f"{evidence.p_value:.3g})" if evidence.p_value is not None else "no test possible)"
    if mae > base_mae and significant:
        return "rollback", f"the candidate is worse: {how}"
    if mae <= base_mae:
        better = "better" if significant else "not worse"
        return "promote", f"the candidate is {better}: {how}"
    return _wait_or_expire(f"worse but not significantly so: {how}", overdue, elapsed)


def _wait_or_expire(missing: str, overdue: bool, elapsed: float) -> tuple[Decision, str]:
    if overdue:
        return "rollback", f"not enough evidence after {elapsed / 60:.0f} min: {missing}"
    return "wait", f"not enough evidence yet: {missing}"
