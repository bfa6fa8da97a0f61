#!/usr/bin/env bash
# make sanitize: builds csrc/ with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/sanitize/_C.abi3.so (a separate CMake tree, -DTOPN_KERNELS_SANITIZE=ON; the normal build
# is not touched) and runs the tests of the native kernels against that library.
#
#   tools/sanitize.sh                  build, then the default selection (SANITIZE_TESTS below)
#   tools/sanitize.sh ARGS...          build, then `pytest ARGS...` under the sanitizers
#   tools/sanitize.sh --exec CMD...    build, then run CMD under the sanitizers
#
# Exits non-zero when the build or a test fails, or when a sanitizer reported anything in any
# process (reports go to build/sanitize/reports/, printed at the end). VENV (default .venv)
# names the environment set up by `make`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=$ROOT/${VENV:-.venv}
PY=$VENV/bin/python
BUILD=$ROOT/build/sanitize
LIB=$BUILD/_C.abi3.so
REPORTS=$BUILD/reports

# The tests that run the native kernels, selected by name rather than by file: every test with
# "native" in its file, function or parameter id (test_topn_create_native.py, the [native]
# parametrizations of every operator's tests, the property tests of the native backends), plus
# the validation tests (test_validation_*), whose inputs reach the native entry points. KeOps
# and Triton (interpreter) tests are deselected by name; so are tests marked gpu or slow.
SANITIZE_TESTS=(tests -k "(native or validation) and not keops and not triton" -m "not gpu and not slow")

# -- build ---------------------------------------------------------------------------------------
"$VENV/bin/cmake" -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DPython_EXECUTABLE="$PY" -DTOPN_KERNELS_SANITIZE=ON
"$VENV/bin/cmake" --build "$BUILD"

# -- run-time environment ------------------------------------------------------------------------
# Python is not instrumented, so the ASan runtime must be the first library of the process (it
# replaces malloc and friends before anything allocates): preload the very libasan the library
# was linked against. libstdc++ too: ASan intercepts __cxa_throw, and finds the real one only
# in the libraries loaded at start-up (else its first C++ exception, a TORCH_CHECK, fails an
# internal CHECK). libubsan needs no preload: it loads as a dependency of the library.
runtime() { ldd "$LIB" | awk -v lib="$1" 'index($1, lib) == 1 { print $3 }'; }
ASAN_RUNTIME=$(runtime libasan.so)
CXX_RUNTIME=$(runtime libstdc++.so)
if [[ ! -f $ASAN_RUNTIME || ! -f $CXX_RUNTIME ]]; then
  echo "sanitize: libasan or libstdc++ missing from the dependencies of $LIB" >&2
  exit 1
fi
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
export TOPN_KERNELS_LIBRARY=$LIB
export HYPOTHESIS_STORAGE_DIRECTORY=$BUILD/hypothesis  # not ./.hypothesis
export LD_PRELOAD=$ASAN_RUNTIME:$CXX_RUNTIME${LD_PRELOAD:+:$LD_PRELOAD}
# detect_leaks=0: CPython and torch keep their allocations to the end by design. ASan writes its
# reports to $REPORTS/asan.PID, so that one from a subprocess whose output a test captured is not
# lost. UBSan stops at the first report (-fno-sanitize-recover=undefined, halt_on_error=1) with
# exit status 86; it ignores log_path next to a preloaded libasan (GCC 12), so its report goes
# to stderr, which pytest leaves alone (--capture=sys below).
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=1:log_path=$REPORTS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=86${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}

# The library that loads must be this one, with ASan active in the process.
"$PY" - "$LIB" <<'PY'
import os, sys
from topn_kernels import native
maps = open("/proc/self/maps").read()
assert native.AVAILABLE, native.UNAVAILABLE_REASON
assert os.path.realpath(sys.argv[1]) in maps, "the sanitized library is not the one loaded"
assert "libasan" in maps and "libubsan" in maps, "no sanitizer runtime in the process"
print(f"sanitize: torch.ops.topn_kernels from {sys.argv[1]}")
PY

# --capture=sys: pytest captures Python's sys.stdout/stderr only, so what the sanitizers write
# to file descriptor 2 reaches the terminal even when they end the process in a test.
PYTEST=("$PY" -m pytest -o cache_dir="$BUILD/pytest_cache" --capture=sys)
status=0
start=$SECONDS
if [[ ${1-} == --exec ]]; then
  shift
  "$@" || status=$?
elif (($#)); then
  "${PYTEST[@]}" "$@" || status=$?
else
  "${PYTEST[@]}" "${SANITIZE_TESTS[@]}" || status=$?
fi
echo "sanitize: ran in $((SECONDS - start)) s, exit status $status"

shopt -s nullglob
reports=("$REPORTS"/*)
for report in "${reports[@]}"; do
  echo "==== $report"
  cat "$report"
done
if ((${#reports[@]})); then
  echo "sanitize: FAILED: AddressSanitizer report(s) above (files in $REPORTS)" >&2
  exit 1
elif ((status == 86)); then
  echo "sanitize: FAILED: UndefinedBehaviorSanitizer stopped the process (report above)" >&2
elif ((status)); then
  echo "sanitize: FAILED (exit status $status): see above" >&2
fi
exit $status
