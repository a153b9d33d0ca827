#!/usr/bin/env bash
# One-call GPU check: install, CUDA test suite, memcheck subset, quick benchmark.
#
#   bash bench/device_check.sh OUTDIR
#
# For a fresh GPU machine that has python3 with torch and triton (and pytest,
# pytest-xdist, matplotlib, tqdm, setuptools) but no package index. Run from anywhere;
# it works in the repository that holds it. Steps, with their time limits (seconds):
#
#   setup      pip install --no-build-isolation --no-deps -e .  (setuptools only), and
#              Liger-Kernel from bench/wheels/*.whl when present (bench/fetch_wheels.sh
#              puts it there; that folder is git-ignored, so name it in the call's carry)
#   tests      python3 -m pytest tests/ on CUDA                           TESTS_TIMEOUT=240
#   sanitizer  compute-sanitizer --tool memcheck python3 -m bench smoke   SANITIZER_TIMEOUT=240
#              (tiny and multi-block fused-op checks against float64, with the caching
#              allocator off so each buffer is its own allocation and an out-of-bounds
#              access cannot land silently inside a pooled block)
#   bench      python3 -m bench --quick --out OUTDIR                      BENCH_TIMEOUT=200
#
# tests and sanitizer are correctness checks and run side by side; the benchmark runs
# alone afterwards so nothing else shares the GPU while it is timed. Worst case about
# 20 + 240 + 200 s = 7.7 minutes. The benchmark writes its JSON after every case, so a
# run cut off by its limit still leaves what it measured.
#
# OUTDIR receives at most 8 files (the device tool returns no more): summary.txt,
# tests.log, sanitizer.log, bench.log, <gpu>-<date>.json, <gpu>-<date>.md and up to two
# PNG plots. Exit status: 0 when every step passed, else 1 (summary.txt says which).

set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/device_check.sh OUTDIR" >&2
    exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TESTS_TIMEOUT=${TESTS_TIMEOUT:-240}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
PYTEST_WORKERS=${PYTEST_WORKERS:-6}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

SUMMARY="$OUTDIR/summary.txt"
START=$(date +%s)
FAILED=0
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME RC SECONDS: one line per step in the summary; 124/137 = ran past its limit.
step() {
    local name=$1 rc=$2 secs=$3 verdict
    case $rc in
        0) verdict=ok ;;
        124|137) verdict="TIMED OUT"; FAILED=1 ;;
        skip*) verdict="NOT RUN: $rc"; FAILED=1 ;;  # a check that did not run is no pass
        *) verdict="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    say "step $name: $verdict, ${secs} s"
}

say "== device check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv,noheader >> "$SUMMARY" 2>&1 || say "nvidia-smi: not available"
"$PY" - >> "$SUMMARY" 2>&1 <<'EOF'
import torch, triton
print(f"python3: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
for name in ("pytest", "xdist", "matplotlib", "tqdm", "setuptools"):
    try:
        __import__(name)
        print(f"  {name}: present")
    except Exception as exc:
        print(f"  {name}: MISSING ({exc})")
EOF

# --- setup -----------------------------------------------------------------------------
t0=$(date +%s)
{
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-build-isolation \
        --no-deps -e . && \
    if compgen -G "bench/wheels/*.whl" > /dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/fg_site bench/wheels/*.whl
    else
        echo "no wheels in bench/wheels: Liger-Kernel will be reported as skipped"
    fi
} >> "$SUMMARY" 2>&1
rc=$?  # of the brace group: the first failing install
if [[ -d /tmp/fg_site ]]; then
    export PYTHONPATH=/tmp/fg_site${PYTHONPATH:+:$PYTHONPATH}
fi
step setup $rc $(( $(date +%s) - t0 ))
if [[ $rc -ne 0 ]]; then
    say "setup failed: nothing else can run"
    exit 1
fi
"$PY" -c "import fusedgrad, sys; print('fusedgrad from', fusedgrad.__file__)" >> "$SUMMARY" 2>&1
"$PY" -c "import liger_kernel.ops.cross_entropy as m; print('liger-kernel from', m.__file__)" \
    >> "$SUMMARY" 2>&1 || say "liger-kernel: not importable (bench skips it with the reason)"

# --- tests and sanitizer, side by side ---------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/nvidia/*/bin; do
    [[ -z $SANITIZER && -x $d/compute-sanitizer ]] && SANITIZER=$d/compute-sanitizer
done

t_par=$(date +%s)
(
    t=$(date +%s)
    timeout -k 10 "$TESTS_TIMEOUT" "$PY" -m pytest -q -n "$PYTEST_WORKERS" -p no:cacheprovider \
        --durations=15 tests/ > "$OUTDIR/tests.log" 2>&1
    echo "$? $(( $(date +%s) - t ))" > /tmp/fg_tests.rc
) &
tests_pid=$!
(
    t=$(date +%s)
    if [[ -z $SANITIZER ]]; then
        echo "compute-sanitizer not found on PATH or under /usr/local/cuda*/bin" \
            > "$OUTDIR/sanitizer.log"
        echo "skipped(compute-sanitizer-not-found) 0" > /tmp/fg_san.rc
        exit 0
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$SANITIZER_TIMEOUT" "$SANITIZER" \
        --tool memcheck --error-exitcode 99 --print-limit 50 \
        "$PY" -m bench smoke > "$OUTDIR/sanitizer.log" 2>&1
    echo "$? $(( $(date +%s) - t ))" > /tmp/fg_san.rc
) &
san_pid=$!
wait "$tests_pid" "$san_pid"
read -r rc secs < /tmp/fg_tests.rc
step tests "$rc" "$secs"
tail -n 3 "$OUTDIR/tests.log" | sed 's/^/    /' >> "$SUMMARY"
read -r rc secs < /tmp/fg_san.rc
step sanitizer "$rc" "$secs"
grep -E "ERROR SUMMARY|^smoke: [0-9]+ passed" "$OUTDIR/sanitizer.log" | sed 's/^/    /' \
    >> "$SUMMARY"
say "tests + sanitizer wall time: $(( $(date +%s) - t_par )) s"

# --- quick benchmark, alone on the GPU ---------------------------------------------------
t0=$(date +%s)
timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m bench --quick --plain --out "$OUTDIR" \
    > "$OUTDIR/bench.log" 2>&1
rc=$?
step bench $rc $(( $(date +%s) - t0 ))
tail -n 1 "$OUTDIR/bench.log" | sed 's/^/    /' >> "$SUMMARY"

say "total: $(( $(date +%s) - START )) s; files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
if [[ $FAILED -ne 0 ]]; then
    say "DEVICE CHECK FAILED"
    exit 1
fi
say "device check passed"
