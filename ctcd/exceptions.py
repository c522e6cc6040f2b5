"""Every error ctcd raises on purpose, in one module. Each says what was wrong and what to do.

(Pydantic validators raise `ValueError`, as pydantic requires; it reports them as a
`ValidationError` naming the field.)"""

from __future__ import annotations

from collections.abc import Iterable


class CtcdError(Exception):
    """Base class for ctcd's errors."""


class DataError(CtcdError, ValueError):
    """The input table cannot be used; raised before any training or registration."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"Data file '{path}' does not exist. Check `data_path`, "
            "or pass data_path=None to use the bundled sample table."
        )


class EmptyDataError(DataError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"Data file '{path}' is empty (no header and no rows). "
            "Point `data_path` at a CSV or Parquet file with a header row and data."
        )


class UnreadableDataError(DataError):
    def __init__(self, path: str, cause: str) -> None:
        super().__init__(
            f"Data file '{path}' cannot be read as CSV or Parquet ({cause}). "
            "Check that it is a UTF-8 CSV with a header row, or a Parquet file ending in .parquet."
        )


class MissingTargetError(DataError):
    def __init__(self, source: str, target: str, columns: Iterable[str]) -> None:
        shown = ", ".join(list(columns)[:20])
        super().__init__(
            f"Target column '{target}' is not in '{source}'. Its columns are: {shown}. "
            "Pass the right column as `target=`."
        )


class NonNumericTargetError(DataError):
    def __init__(self, source: str, target: str, dtype: str, example: object) -> None:
        super().__init__(
            f"Target column '{target}' in '{source}' is not numeric (dtype {dtype}, "
            f"e.g. {example!r}). ctcd trains regressors: convert the target to numbers "
            "or choose a numeric column as `target=`."
        )


class TooFewRowsError(DataError):
    def __init__(self, source: str, rows: int, minimum: int) -> None:
        super().__init__(
            f"'{source}' has {rows} usable rows; at least {minimum} are needed to split "
            "80/20 and train. Add rows to the table."
        )


class DataContractError(DataError):
    def __init__(self, source: str, problems: Iterable[str]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"'{source}' breaks the data contract:\n{lines}\n"
            "Fix the table (or its export) and run again."
        )


class DeployerNotFoundError(CtcdError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"No saved deployer block named '{name}'. Save one first, e.g. "
            "`MLflowModelDeployer(port=8080).save('my-deployer')`, or pass deployer=None "
            "for the local MLflow deployer with defaults."
        )


class ServiceNotFoundError(CtcdError, LookupError):
    def __init__(self, what: str) -> None:
        super().__init__(f"No model server matches {what}. List them with `ctcd models list`.")


class ModelServerError(CtcdError, RuntimeError):
    """A model server failed to start, to load a model, or to answer in time."""

    def __init__(self, action: str, cause: str, log_tail: str = "", hint: str = "") -> None:
        message = f"{action} failed: {cause}"
        if log_tail:
            message += f"\n--- last lines of the server log ---\n{log_tail}"
        if hint:
            message += f"\n{hint}"
        super().__init__(message)


class ModelLoadError(ModelServerError):
    """A model version failed its pre-flight load and probe; nothing was swapped."""

    def __init__(
        self,
        model: str,
        version: str,
        log_tail: str,
        outcome: str = "the server that was serving keeps serving its current version",
    ) -> None:
        super().__init__(
            f"Probing {model} version {version}",
            f"the model did not load or could not predict its own input example; {outcome}",
            log_tail,
            "Fix the model (or its dependencies) and deploy again.",
        )


class RolloutFailed(ModelServerError):
    """A cluster's controller reported that the asked spec cannot serve."""


class SeldonFailed(RolloutFailed):
    """Seldon Core's operator reported `Failed` for the SeldonDeployment."""


class KServeFailed(RolloutFailed):
    """KServe reported that the predictor cannot serve the asked model."""


class LocalApiError(CtcdError, RuntimeError):
    """The local Prefect server ctcd started for runs with embedded defaults is not usable."""

    def __init__(self, url: str, problem: str, log: str) -> None:
        super().__init__(
            f"The local Prefect server at {url} (started by ctcd) is not answering: {problem}. "
            f"Its log: {log}. Run `ctcd prefect-server stop` and try again, point "
            "PREFECT_API_URL at a server you run, or set CTCD_LOCAL_API=0 to let Prefect start "
            "a temporary one per process."
        )


class PrefectApiLost(CtcdError, RuntimeError):
    """The Prefect API stopped answering while a flow ran, so the run could not record its
    end. Says whether the work itself finished and how to bring the server back; `result` holds
    what the flow returned when the work finished (None otherwise)."""

    def __init__(self, api_url: str, run: str, work: str, fix: str, result: object = None):
        self.api_url, self.result = api_url, result
        super().__init__(
            f"The Prefect API at {api_url} stopped answering during flow run {run}, so the "
            f"run could not record its end. {work} {fix}"
        )


class StateFileError(CtcdError, ValueError):
    """A state file ctcd keeps (a server's record, its desired state, ...) cannot be read or
    does not hold what it must: names the file, what is wrong with it, and what to do."""

    def __init__(self, path: object, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path} is unreadable: {problem}. {fix}")


class DeployError(CtcdError, RuntimeError):
    """`make deploy` could not apply prefect.yaml (nothing was applied when it says so)."""


class PredictionError(CtcdError):
    """A request the server did not answer with predictions; the message says why."""


class ModelConfigError(CtcdError, ValueError):
    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}")


class RollbackError(CtcdError, ValueError):
    def __init__(self, model: str, why: str) -> None:
        super().__init__(
            f"Cannot roll back {model}: {why}. "
            "`ctcd models rollback ID --to-version V` serves a given registered version."
        )


class VaultError(CtcdError, RuntimeError):
    """Vault could not be reached, refused the credentials, or has no such secret. Names the
    address, path and key — never a value."""

    def __init__(
        self, address: str, problem: str, check: str, path: str = "", key: str = ""
    ) -> None:
        self.address, self.problem, self.check = address, problem, check
        self.path, self.key = path, key
        where = f"Vault at {address}"
        if path:
            where += f", secret '{path}'" + (f" key '{key}'" if key else "")
        super().__init__(f"{where}: {problem}. Check {check}.")


class TrackingError(CtcdError, RuntimeError):
    """The MLflow tracking server cannot be used with the configured credentials. Names the
    server and where the credentials come from — never their values."""

    def __init__(self, uri: str, problem: str, check: str) -> None:
        super().__init__(f"MLflow tracking server at {uri}: {problem}. Check {check}.")


class KubernetesAccessError(CtcdError, PermissionError):
    """The Kubernetes API server refused a request: names who asked, the verb, the resource
    with its API group, the namespace, and what grants it. `verb`, `resource`, `group` and
    `namespace` hold what was refused (empty when the server did not say)."""

    def __init__(
        self,
        refused: str,
        fix: str,
        verb: str = "",
        resource: str = "",
        group: str = "",
        namespace: str = "",
    ) -> None:
        self.verb, self.resource, self.group, self.namespace = verb, resource, group, namespace
        super().__init__(f"Kubernetes refused {refused}. {fix}")
