#!/usr/bin/env bash
# One brief check on a single-GPU machine, everything in one call (see benchmarks/gpu_check.py):
# DiT-XL/2 bf16 FSDP2 on one rank (eager / activation checkpointing / torch.compile; flow matching and
# token routing eager) with images/s
# and MFU against a measured bf16 matmul rate, DDIM sampling, and bf16-vs-fp32 correctness.
# Finishes in under 8 minutes and prints a short table last.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--cpu-smoke] [...gpu_check.py options]
#
# The GPU machine brings its own PyTorch, timm, numpy, safetensors and friends; what the project
# needs beyond them (omegaconf) is installed from wheels carried in .whl/ (no package index there),
# else from the index when one is reachable. The project's own torch pin is not applied: the
# machine's torch is used as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$($PY - <<'PY'
import importlib.util
need = {"omegaconf": "omegaconf", "timm": "timm", "safetensors": "safetensors", "numpy": "numpy", "yaml": "pyyaml",
        "pyarrow": "pyarrow", "scipy": "scipy", "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "[gpu_check.sh] installing: $missing"
  site=/tmp/speed-gpu-check-site
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  else
    # An index is reachable (not on this workplace's GPU machines): the pinned versions of what is missing.
    pins=$(for p in $missing; do grep -i "^$p" requirements.txt || echo "$p"; done)
    $PY -m pip install -q --target "$site" $pins
  fi
  export PYTHONPATH="$PYTHONPATH:$site"
fi
# Leave CPU threads to the GPU feed; 8 is plenty for the host side of one training process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
limit=${GPU_CHECK_TIMEOUT_S:-470}
timeout --signal=INT --kill-after=15 "$limit" $PY -m benchmarks.gpu_check "$@"
rc=$?
[ $rc -eq 124 ] && echo "[gpu_check.sh] stopped at the ${limit} s limit"
exit $rc
