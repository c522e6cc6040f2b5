#!/usr/bin/env bash
# MLServer (Seldon's V2 server) with its MLflow runtime, as a benchmark peer for
# bench/serving.py, in a venv of its own: it does not install beside Prefect 3.9 (fastapi pins).
#   bash bench/mlserver_setup.sh [VENV]     default VENV: ~/.cache/ctcd-bench/mlserver-venv
# Same MLflow, scikit-learn and skops as uv.lock, so it loads the very model ctcd serves.
# uvloop < 0.22: with 0.22, MLServer 1.7.1's inference workers die at start (no current event loop).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${MLSERVER_VENV:-$HOME/.cache/ctcd-bench/mlserver-venv}}"
uv=".tools/bin/uv"
[ -x "$uv" ] || make -s .tools/bin/uv
pin() { grep -A1 "^name = \"$1\"$" uv.lock | sed -n 's/^version = "\(.*\)"/\1/p'; }
[ -x "$venv/bin/python" ] || "$uv" venv -q -p python3.11 "$venv"
VIRTUAL_ENV="$venv" "$uv" pip install -q "mlserver==1.7.1" "mlserver-mlflow==1.7.1" \
  "mlflow==$(pin mlflow)" "scikit-learn==$(pin scikit-learn)" "skops==$(pin skops)" \
  "pandas==$(pin pandas)" "numpy==$(pin numpy)" "uvloop<0.22"
"$venv/bin/mlserver" --version
