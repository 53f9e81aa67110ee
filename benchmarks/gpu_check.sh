#!/usr/bin/env bash
# One-GPU check (under 8 minutes): needs only PyTorch and torchvision on the machine; the other
# pure-Python/binary needs come from benchmarks/wheels/ when absent (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 KEDRO_DISABLE_TELEMETRY=1
PY=${PYTHON:-python3}
missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("pydicom", "cv2", "pandas", "pyarrow", "tqdm", "sklearn", "fsspec")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from benchmarks/wheels for: $missing"
  $PY -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site benchmarks/wheels/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec $PY benchmarks/gpu_check.py "$@"
