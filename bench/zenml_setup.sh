#!/usr/bin/env bash
# ZenML as a benchmark peer, in a venv of its own (never in the project's lock):
#   bash bench/zenml_setup.sh [VENV]     default VENV: ~/.cache/ctcd-bench/zenml-venv
# Same scikit-learn, pandas, numpy and pyarrow as uv.lock, so the ML work is identical.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${ZENML_VENV:-$HOME/.cache/ctcd-bench/zenml-venv}}"
uv=".tools/bin/uv"
[ -x "$uv" ] || make -s .tools/bin/uv
pin() { grep -A1 "^name = \"$1\"$" uv.lock | sed -n 's/^version = "\(.*\)"/\1/p'; }
[ -x "$venv/bin/python" ] || "$uv" venv -q -p python3.11 "$venv"
VIRTUAL_ENV="$venv" "$uv" pip install -q "zenml[local]==0.98.0" \
  "scikit-learn==$(pin scikit-learn)" "pandas==$(pin pandas)" "numpy==$(pin numpy)" \
  "pyarrow==$(pin pyarrow)"
"$venv/bin/python" -c "import zenml, sklearn; print('zenml', zenml.__version__, 'scikit-learn', sklearn.__version__)"
