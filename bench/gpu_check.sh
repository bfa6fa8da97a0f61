#!/usr/bin/env bash
# GPU check of the Triton topn_create, one command on a GPU machine with no network:
#
#   bash bench/gpu_check.sh            # from the repository root; OUT=<dir> to choose the output
#
# 1. installs the wheels carried in .whl/ (if any) into /tmp/site;
# 2. builds the C++ extension against the machine's own torch (pip -e, --no-deps: the
#    machine's torch may be older than pyproject's runtime pin; the Triton tests do not need it);
# 3. runs the GPU tests (tests/test_topn_create_triton.py, the triton and GPU cases of
#    test_topn_create.py);
# 4. runs the topn_create benchmark, one shape at a time (eager, compile and triton providers),
#    and checks the Triton kernels' GPU targets against it (bench/topn_create.py: check_targets).
# Writes $OUT/gpu_check.json (what ran, its status, the targets), $OUT/gpu_check.log (all output),
# $OUT/tests.xml (JUnit), $OUT/bench.json and $OUT/bench.png (the benchmark rows and plot).
# Without a CUDA GPU it stops at once with a message and status 2. Each step has a time limit,
# and the run stops starting steps once GPU_CHECK_SECONDS (default 540) have passed, so that it
# ends within a 10-minute lease command whatever hangs; most of the time goes to compiling
# kernels and torch.compile graphs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
STEPS="$OUT/.steps"
: >"$STEPS"
export PYTHONUNBUFFERED=1
DEADLINE=$(($(date +%s) + ${GPU_CHECK_SECONDS:-540}))

log() { echo "gpu_check: $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs it, records its status
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    log "$name: skipped, out of time"
    echo "$name skipped 0" >>"$STEPS"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name $rc $(($(date +%s) - start))" >>"$STEPS"
  log "$name: status $rc after $(($(date +%s) - start)) s"
  return $rc
}
summary() {  # summary OK REASON: writes gpu_check.json from the recorded steps
  "$PYTHON" - "$OUT" "$1" "$2" <<'EOF' || echo "{\"ok\": false, \"reason\": \"$2\"}" >"$OUT/gpu_check.json"
import json, sys
from pathlib import Path

out, ok, reason = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
steps = {}
for line in (out / ".steps").read_text().splitlines():
    name, rc, seconds = line.split()
    steps[name] = {"status": rc if rc == "skipped" else int(rc), "seconds": int(seconds)}
result = {"ok": ok, "reason": reason, "steps": steps}
try:
    import torch

    result["torch"] = torch.__version__
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    import triton

    result["triton"] = triton.__version__
except Exception as err:  # the summary must be written whatever is missing
    result["import_error"] = repr(err)
if (out / "targets.json").exists():
    result["targets"] = json.loads((out / "targets.json").read_text())
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
EOF
}

if ! reason=$("$PYTHON" -c "
import sys
try:
    import torch
except ImportError as err:
    sys.exit(f'torch does not import ({err})')
if not torch.cuda.is_available():
    sys.exit(f'no CUDA GPU visible to torch {torch.__version__}')
" 2>&1); then
  log "$reason ($PYTHON): nothing to check here; run this on a GPU machine"
  summary 0 "$reason"
  rm -f "$STEPS"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step build 180 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ||
  log "build failed: the native extension is missing; the Triton checks go on without it"

parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
step tests 200 "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" -k "triton or gpu" \
  --junitxml="$OUT/tests.xml" tests/test_topn_create_triton.py tests/test_topn_create.py
tests_rc=$?

BENCH_TMP=$(mktemp -d)
bench_rc=0
for shape in paper target target_bf16 large_batch point_cloud; do  # the targets' shapes first
  step "bench_$shape" 120 "$PYTHON" -m bench --op topn_create --shape "$shape" \
    --out "$BENCH_TMP/$shape" || bench_rc=1
done
# The report runs whatever time is left: the rows measured so far and the targets.
log "targets: rows of $BENCH_TMP"
timeout 60 "$PYTHON" -c "
import json, sys
from pathlib import Path
from bench.topn_create import check_targets
from bench.report import plot, table
rows = [r for p in sorted(Path(sys.argv[1]).glob('*/*.json')) for r in json.loads(p.read_text())]
Path(sys.argv[2], 'bench.json').write_text(json.dumps(rows, indent=1) + '\n')
print(table(rows))
targets = check_targets(rows)
Path(sys.argv[2], 'targets.json').write_text(json.dumps(targets, indent=1) + '\n')
for t in targets:
    print('PASS' if t['met'] else 'MISS', t['target'], t['shape'], t['measured'])
if rows:
    plot(rows, Path(sys.argv[2], 'bench.png'))
" "$BENCH_TMP" "$OUT" 2>&1 | tee -a "$LOG"
rm -rf "$BENCH_TMP"

if [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]; then
  summary 1 "tests passed; benchmark rows in bench.json, targets in targets"
  status=0
else
  summary 0 "tests status $tests_rc, benchmark status $bench_rc (see gpu_check.log)"
  status=1
fi
rm -f "$STEPS"
tail -n 40 "$LOG"
exit $status
