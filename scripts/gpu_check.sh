#!/usr/bin/env bash
# The suite and the meta-step benchmarks on a machine with a CUDA GPU and a CUDA build of
# torch already installed (nothing is downloaded): the suite's CUDA tests run the
# benchmarks' quick forms on the GPU; then bench_meta, bench_memory and bench_fused run in
# full with --device cuda, one JSON line each. Everything lands in $OUT (default:
# runs/gpu). Run it from the repository root:
#
#   bash scripts/gpu_check.sh                      # python3 with torch and CUDA
#   PARTS=suite bash scripts/gpu_check.sh          # the suite only (PARTS=bench: the benchmarks only)
#   WORKERS=8 bash scripts/gpu_check.sh            # the suite on 8 pytest-xdist workers
#   PYTHON=.venv/bin/python DEVICE=cpu QUICK=1 PYTEST_ARGS=tests/test_ops.py bash scripts/gpu_check.sh   # a dry run here
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

"$PY" - "$DEVICE" <<'PY' | tee "$OUT/machine.txt" || exit 1
import sys, torch
device = torch.device(sys.argv[1])
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
import importlib.util
missing = [m for m in ("numpy", "yaml", "networkx", "einops", "tqdm", "safetensors", "PIL", "pytest", "hypothesis") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: python lacks {', '.join(missing)} (carry them as wheels)")
print(f"torch {torch.__version__}, {name}, CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
PY

PARTS=${PARTS:-suite bench}
if [[ " $PARTS " == *" suite "* ]]; then
  # the suite (its CUDA tests run where torch sees a GPU)
  workers=${WORKERS:+-n $WORKERS}
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -p no:cacheprovider $workers ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest.txt" | tail -n 25 || status=1
fi

quick=${QUICK:+--quick}
[[ " $PARTS " == *" bench "* ]] || exit $status
for bench in "meta --no-vmap" memory fused; do
  name=${bench%% *}
  # shellcheck disable=SC2086
  if ! "$PY" "scripts/bench_$name.py" ${bench#"$name"} --device "$DEVICE" $quick > "$OUT/bench_$name.json" 2> "$OUT/bench_$name.err"; then
    echo "bench_$name failed:"; tail -n 5 "$OUT/bench_$name.err"; status=1
  else
    echo "bench_$name: $(head -c 300 "$OUT/bench_$name.json") ..."
  fi
done
exit $status
