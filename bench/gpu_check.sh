#!/usr/bin/env bash
# GPU check of the Triton topn_create, one command on a GPU machine with no network:
#
#   bash bench/gpu_check.sh            # from the repository root; OUT=<dir> to choose the output
#
# 1. installs the wheels carried in .whl/ (if any) into /tmp/site;
# 2. benchmarks the targets' shapes first (bench/topn_create.py: target and target_bf16
#    forward, then the paper shape in its four directions), every Triton path beside the eager
#    reference, each path's index compared with the reference's (the rows' params);
# 3. runs the GPU tests of tests/test_topn_create_triton.py (every path at the benchmark
#    shapes among them) and the triton and GPU cases of test_topn_create.py, then benchmarks
#    the paper shape's torch.compile and torch.compile(mode="reduce-overhead") baselines;
# 4. benchmarks the other shapes (large_batch, point_cloud), and set2graph_logits when its
#    benchmark has a Triton provider;
# 5. builds the C++ extension last, with what time is left (the Triton checks do not need it:
#    the package imports without it).
# The targets are checked against the benchmark rows (bench/topn_create.py: check_targets).
# Writes one record, $OUT/gpu_check.json: each step's status and seconds (or why it did not
# run: out_of_time, no_triton_provider; listed again under "skipped"), the tests' counts and
# failures, the targets and the benchmark rows. Beside it: $OUT/gpu_check.log (all output),
# $OUT/tests_*.xml (JUnit), $OUT/bench.json and $OUT/bench.png (the rows and their plot).
# Without a CUDA GPU it stops at once with a message and status 2. Each step has a time limit
# (SIGINT at the limit: pytest still writes its XML, and the benchmark runner keeps the rows
# it measured, as it rewrites them after each case), and no step starts or runs past
# GPU_CHECK_SECONDS (default 540) minus 50 s kept for the report, so that the whole run ends
# within a 10-minute lease command whatever hangs; most of the time goes to compiling kernels
# and torch.compile graphs.
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
# steps start and end before DEADLINE; the last 50 s are kept for the report and the summary
DEADLINE=$(($(date +%s) + ${GPU_CHECK_SECONDS:-540} - 50))

log() { echo "gpu_check: $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs it, records its status
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    log "$name: skipped, out of time"
    echo "$name out_of_time 0" >>"$STEPS"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name: $*"
  start=$(date +%s)
  # SIGINT first: pytest then stops and still writes its JUnit XML of the tests run so far
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name $rc $(($(date +%s) - start))" >>"$STEPS"
  log "$name: status $rc after $(($(date +%s) - start)) s"
  return $rc
}
summary() {  # summary OK REASON: writes gpu_check.json, the one record of the run
  "$PYTHON" - "$OUT" "$1" "$2" <<'EOF' || echo "{\"ok\": false, \"reason\": \"$2\"}" >"$OUT/gpu_check.json"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, ok, reason = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
steps = {}
for line in (out / ".steps").read_text().splitlines():
    name, rc, seconds = line.split()
    status = int(rc) if rc.lstrip("-").isdigit() else rc  # or why it did not run
    steps[name] = {"status": status, "seconds": int(seconds)}
result = {"ok": ok, "reason": reason, "steps": steps}
result["skipped"] = {name: s["status"] for name, s in steps.items() if isinstance(s["status"], str)}
try:
    import torch

    result["torch"] = torch.__version__
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    import triton

    result["triton"] = triton.__version__
except Exception as err:  # the summary must be written whatever is missing
    result["import_error"] = repr(err)
tests = {}
for path in sorted(out.glob("tests_*.xml")):
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except ET.ParseError as err:
        tests[path.stem] = {"error": repr(err)}
        continue
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    tests[path.stem] = counts
result["tests"] = tests
for name in ("targets", "bench"):
    if (out / f"{name}.json").exists():
        result[name] = json.loads((out / f"{name}.json").read_text())
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "bench"}, indent=1))
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

BENCH_TMP=$(mktemp -d)
bench_rc=0
bench() {  # bench OP SHAPE SECONDS [PROVIDERS]: PROVIDERS (bench/topn_create.py) names a step
  local name="bench_$2${4:+_${4//,/_}}"
  TOPN_BENCH_PROVIDERS="${4:-}" step "$name" "$3" "$PYTHON" -m bench --op "$1" --shape "$2" \
    --out "$BENCH_TMP/$name" || bench_rc=1
}
# the targets' shapes first, the Triton paths before the torch.compile baselines, so that a
# baseline's compile time cannot cost the Triton rows
bench topn_create target 80 eager,triton
bench topn_create target_bf16 50 eager,triton
bench topn_create paper 70 eager,triton

tests_rc=0
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
# one pytest for both files (51 s and 58 s as two steps on an H200 with 8 workers; a SIGINT
# during xdist's teardown leaves no JUnit file, so the limit keeps a margin)
step tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" -k "triton or gpu" \
  --junitxml="$OUT/tests_gpu.xml" tests/test_topn_create_triton.py tests/test_topn_create.py ||
  tests_rc=1
# both baselines of the paper's targets: each direction's graphs compile for 30-40 s on an H200
bench topn_create paper 200 compile
bench topn_create large_batch 60
bench topn_create point_cloud 60
if "$PYTHON" -c "
import sys, torch
from bench import set2graph_logits
providers = {c.provider for c in set2graph_logits.cases(torch.device('cuda'))}
sys.exit(0 if any(p.startswith('triton') for p in providers) else 1)
" >>"$LOG" 2>&1; then
  bench set2graph_logits qm9 60
else
  log "bench_set2graph_logits: skipped, its benchmark has no triton provider"
  echo "bench_set2graph_logits no_triton_provider 0" >>"$STEPS"
fi

# The report runs whatever time is left: the rows measured so far and the targets.
log "targets: rows of $BENCH_TMP"
timeout 40 "$PYTHON" -c "
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

# Last, with what time is left: the C++ extension against the machine's own torch (pip -e,
# --no-deps: the machine's torch may be older than pyproject's runtime pin).
step build 120 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ||
  log "build failed or skipped: the native extension is not checked here"

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
