#!/usr/bin/env bash
# One-call GPU check for a device lease: at most 9 minutes under one global deadline.
#
#   bash bench/device_check.sh OUTDIR [COMMIT]     # run (COMMIT: recorded in every result)
#   bash bench/device_check.sh --list              # planned GPU selection and time budget
#
# For a fresh GPU machine with python3, torch, triton (pytest, pytest-xdist; optional:
# pytest-timeout, matplotlib, compute-sanitizer, ncu) and no package index. Works in the
# repository that holds it (the device copy has no .git: pass the commit). Steps, each
# under its own limit and all under DEADLINE = start + BUDGET (540 s); a step that would
# start with less than MIN_STEP seconds left is reported NOT RUN:
#
#   preflight  versions (torch, triton, numpy, setuptools, wheel, pytest plugins), GPU
#              name and compute mode; exits 3 at once when torch sees no CUDA device
#   setup      pip install -e . (no index, no build isolation); on failure the package is
#              copied into a scratch folder on PYTHONPATH instead. Optional peers
#              (bench/wheels/*.whl, e.g. Liger-Kernel) only warn when they fail
#   tests      the CUDA test suite (pytest -n 6, per-test limit with pytest-timeout)
#   memcheck   in parallel with tests: compute-sanitizer memcheck (--report-api-errors no)
#              on `python -m bench smoke`, then the kernel tests for as long as time allows;
#              judged on memory errors only (a lane cut by its limit is not a failure)
#   ce         CE bf16 8192 x {32000, 128256, 256000}: fwd+bwd, fwd and backward-only, vs
#              eager, inplace and Liger (bench JSON after every case)
#   compile    torch.compile peer on the same cases, in its own pass
#   correct    each timed fusedgrad CE result against eager at the benchmarked sizes
#   host       host us/call, GPU us/call, CUDA-graph replay us (or the capture error), CE, BN
#   big        one CE and one BatchNorm call of > 2^31 elements against eager
#   ncu        Nsight Compute DRAM bytes of CE at 128256 and 256000 (skipped without ncu)
#   bn+e2e     BatchNorm and end-to-end --quick cases, only with the time that remains
#
# OUTDIR receives at most 8 files: summary.txt, run.log, tests.log, memcheck.log,
# bench-ce.json, bench-compile.json, bench-bn.json, probes.json. Markdown and plots are
# rebuilt afterwards: python -m bench.device_probes render OUTDIR/bench-*.json --out DIR.
# Headline numbers and failing test names are printed to stdout (and summary.txt).
# Exit status: 0 all passed, 1 a step failed, 2 usage, 3 no CUDA device.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
MIN_STEP=${MIN_STEP:-15}
RESERVE=10  # seconds kept for the summary after the last step
# Step limits (seconds). Their sum is the worst case; --list prints it (must be <= 540).
STEPS=(preflight setup tests+memcheck ce compile correct host big ncu)
declare -A LIMIT=([preflight]=30 [setup]=45 [tests+memcheck]=180 [ce]=100 [compile]=60
                  [correct]=35 [host]=25 [big]=40 [ncu]=25)
# The GPU selection (python -m bench arguments).
CE_SEL=(--op ce --dtype bf16 --shape 8192x32000 8192x128256 8192x256000
        --mode fwd+bwd fwd bwd --impl fusedgrad inplace torch liger)
COMPILE_SEL=(--op ce --dtype bf16 --shape 8192x128256 8192x256000 --mode fwd+bwd fwd bwd
             --impl compile)
BN_SEL=(--quick --op bn e2e --impl fusedgrad inplace torch liger)
MEMCHECK_TESTS=(tests/test_cross_entropy.py tests/test_cross_entropy_coverage.py
                tests/test_bn_launch.py tests/test_batch_norm.py
                tests/test_cross_entropy_autograd.py)

if [[ ${1:-} == --list ]]; then
    cd "$ROOT" || exit 2
    total=0
    echo "device check plan (global deadline ${BUDGET} s; bn+e2e gets what remains):"
    for s in "${STEPS[@]}"; do
        printf '  %-16s %4d s\n' "$s" "${LIMIT[$s]}"
        total=$(( total + LIMIT[$s] ))
    done
    echo "worst case: ${total} s (sum of step limits; deadline ${BUDGET} s)"
    (( total <= 540 )) || echo "WARNING: budget over 9 minutes"
    echo "memcheck: bench smoke, then ${MEMCHECK_TESTS[*]}"
    echo "probes: correct (ce bf16 8192 x 32000/128256/256000, bn), host (ce, bn), big (ce, bn"
    echo "        > 2^31 elements), ncu (ce 8192x128256, 8192x256000)"
    for pass in ce compile bn; do
        case $pass in
            ce) sel=("${CE_SEL[@]}") ;; compile) sel=("${COMPILE_SEL[@]}") ;; bn) sel=("${BN_SEL[@]}") ;;
        esac
        echo "pass $pass: python -m bench ${sel[*]}"
        PYTHONPATH=$ROOT "$PY" -m bench --list "${sel[@]}" | sed 's/^/    /'
    done
    exit 0
fi

if [[ $# -lt 1 || $# -gt 2 || ${1:0:1} == - ]]; then
    echo "usage: bash bench/device_check.sh OUTDIR [COMMIT] | --list" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export FUSEDGRAD_COMMIT=$COMMIT PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

START=$(date +%s)
DEADLINE=$(( START + BUDGET - RESERVE ))
WORK=$(mktemp -d /tmp/fg_check.XXXXXX)  # fresh: no status file of an earlier run is read
# Files of an earlier run in OUTDIR must not read as this run's.
rm -f "$OUTDIR"/{summary.txt,run.log,tests.log,memcheck.log,bench-ce.json,bench-compile.json,bench-bn.json,probes.json}
SUMMARY="$OUTDIR/summary.txt"
RUNLOG="$OUTDIR/run.log"
FAILED=0
: > "$SUMMARY"
: > "$RUNLOG"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
# limit_for STEP: the step's limit, cut to the time left before the deadline.
limit_for() {
    local l=${LIMIT[$1]:-0} r
    r=$(left)
    (( r < l )) && l=$r
    echo "$l"
}
# verdict NAME RC SECONDS [NOTE]: one line per step; 124/137 = ran past its limit.
verdict() {
    local name=$1 rc=$2 secs=$3 note=${4:-} v
    case $rc in
        0) v=ok ;;
        124|137) v="TIMED OUT"; FAILED=1 ;;
        partial) v="ok (cut at its limit)" ;;
        skip:*) v="NOT RUN (${rc#skip:})"; FAILED=1 ;;
        warn:*) v="skipped (${rc#warn:})" ;;
        *) v="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    say "step $name: $v, ${secs} s${note:+; $note}"
}
# run_step NAME CMD...: CMD under the step's limit, output appended to run.log.
run_step() {
    local name=$1 l t0 rc
    shift
    l=$(limit_for "$name")
    if (( l < MIN_STEP )); then
        verdict "$name" "skip:no time left before the deadline" 0
        return 1
    fi
    t0=$(date +%s)
    echo "=== $name (limit $l s): $*" >> "$RUNLOG"
    timeout -k 5 "$l" "$@" >> "$RUNLOG" 2>&1
    rc=$?
    verdict "$name" "$rc" $(( $(date +%s) - t0 ))
    return $rc
}

say "== device check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT, budget ${BUDGET} s"

# --- preflight ---------------------------------------------------------------------------
t0=$(date +%s)
{ timeout 10 nvidia-smi --query-gpu=name,compute_mode,driver_version,memory.total \
      --format=csv,noheader || echo "nvidia-smi: not available"; } 2>&1 | tee -a "$SUMMARY"
timeout -k 5 "${LIMIT[preflight]}" "$PY" -m bench.device_probes preflight \
    --out "$WORK/probe-preflight.json" 2>&1 | tee -a "$SUMMARY"
rc=${PIPESTATUS[0]}
if [[ $rc -eq 3 ]]; then
    say "step preflight: no CUDA device, $(( $(date +%s) - t0 )) s"
    say "NO CUDA: torch sees no GPU on this machine. Nothing was run; this check needs a"
    say "CUDA device (see bench/NOTES.md). Exiting."
    exit 3
fi
verdict preflight "$rc" $(( $(date +%s) - t0 ))
if [[ $rc -ne 0 ]]; then
    say "preflight failed (exit $rc): python3 with torch could not start; exiting"
    exit 1
fi

# --- setup -------------------------------------------------------------------------------
t0=$(date +%s)
SITE="$WORK/site"
mkdir -p "$SITE"
{
    echo "=== setup"
    timeout 60 "$PY" -m pip install -q --disable-pip-version-check --no-index \
        --no-build-isolation --no-deps -e .
} >> "$RUNLOG" 2>&1
install_rc=$?
if [[ $install_rc -ne 0 ]]; then
    # The package without pip: ops/ is fusedgrad, kernels/ is fusedgrad.kernels.
    mkdir -p "$SITE/fusedgrad" && cp -r ops/. "$SITE/fusedgrad/" \
        && rm -rf "$SITE/fusedgrad/kernels" && cp -r kernels "$SITE/fusedgrad/kernels"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    say "setup: pip install -e . failed (exit $install_rc, see run.log); using a copy on PYTHONPATH"
fi
if compgen -G "bench/wheels/*.whl" > /dev/null; then
    if timeout 60 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
            --no-compile --no-cache-dir --upgrade --target "$WORK/peers" bench/wheels/*.whl \
            >> "$RUNLOG" 2>&1; then
        export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$WORK/peers
    else
        say "setup: optional peer wheels failed to install (warning only; Liger is skipped)"
    fi
else
    say "setup: no wheels in bench/wheels (optional): Liger-Kernel is reported as skipped"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
where=$(timeout 60 "$PY" -c "import fusedgrad; print(fusedgrad.__file__)" 2>&1 | tail -1)
rc=$?
[[ $where == /* ]] || rc=1
verdict setup "$rc" $(( $(date +%s) - t0 )) "fusedgrad from $where"
if [[ $rc -ne 0 ]]; then
    say "setup failed: fusedgrad cannot be imported; exiting"
    exit 1
fi
TIMEOUT_ARGS=()
if timeout 30 "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TIMEOUT_ARGS=(--timeout 120)
fi

# --- tests and memcheck, side by side ----------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/nvidia/*/bin; do
    [[ -z $SANITIZER && -x $d/compute-sanitizer ]] && SANITIZER=$d/compute-sanitizer
done
lane=$(limit_for tests+memcheck)
t_par=$(date +%s)
(
    t=$(date +%s)
    timeout -k 10 "$lane" "$PY" -m pytest -q -n "${PYTEST_WORKERS:-6}" -p no:cacheprovider \
        ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} -rfE --durations=10 tests/ > "$OUTDIR/tests.log" 2>&1
    echo "$? $(( $(date +%s) - t ))" > "$WORK/tests.rc"
) &
tests_pid=$!
(
    t=$(date +%s)
    if [[ -z $SANITIZER ]]; then
        echo "compute-sanitizer not found on PATH or under /usr/local/cuda*/bin" \
            > "$OUTDIR/memcheck.log"
        echo "warn:compute-sanitizer not found $(( $(date +%s) - t ))" > "$WORK/memcheck.rc"
        exit 0
    fi
    san=("$SANITIZER" --tool memcheck --report-api-errors no --print-limit 50)
    {
        echo "=== memcheck: bench smoke"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$lane" "${san[@]}" \
            "$PY" -m bench smoke
        echo "=== memcheck: kernel tests, as far as the lane's time goes"
        rest=$(( lane - ($(date +%s) - t) - 5 ))
        if (( rest > 20 )); then
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$rest" "${san[@]}" \
                "$PY" -m pytest -q -p no:cacheprovider "${MEMCHECK_TESTS[@]}"
            echo "=== memcheck tests exit $?"
        fi
    } > "$OUTDIR/memcheck.log" 2>&1
    # Judged on memory errors alone: the sum of the ERROR SUMMARY counts.
    errors=$(grep -oE "ERROR SUMMARY: [0-9]+" "$OUTDIR/memcheck.log" \
             | awk '{s += $3} END {print s + 0}')
    runs=$(grep -c "ERROR SUMMARY" "$OUTDIR/memcheck.log")
    if (( errors > 0 )); then
        echo "$errors $(( $(date +%s) - t )) $runs" > "$WORK/memcheck.rc"
    elif (( runs == 0 )); then
        echo "no-summary $(( $(date +%s) - t )) 0" > "$WORK/memcheck.rc"
    else
        echo "0 $(( $(date +%s) - t )) $runs" > "$WORK/memcheck.rc"
    fi
) &
san_pid=$!
wait "$tests_pid" "$san_pid"
read -r rc secs < "$WORK/tests.rc" || { rc=missing; secs=0; }
verdict tests "$rc" "$secs"
grep -E "^(FAILED|ERROR) " "$OUTDIR/tests.log" | sed 's/^/    /' | tee -a "$SUMMARY"
tail -n 1 "$OUTDIR/tests.log" | sed 's/^/    /' | tee -a "$SUMMARY"
read -r rc secs runs < "$WORK/memcheck.rc" || { rc=missing; secs=0; runs=0; }
case $rc in
    warn:*) verdict memcheck "$rc" "$secs" ;;
    0) verdict memcheck 0 "$secs" "no memory errors in $runs sanitizer run(s)" ;;
    no-summary) verdict memcheck 1 "$secs" "no ERROR SUMMARY: the sanitizer did not finish" ;;
    *) verdict memcheck 1 "$secs" "$rc memory error(s)"
       grep -m 10 -E "^========= (Invalid|Out of bounds|Address)" "$OUTDIR/memcheck.log" \
           | sed 's/^/    /' | tee -a "$SUMMARY" ;;
esac
say "tests + memcheck wall time: $(( $(date +%s) - t_par )) s"

# --- benchmarks, alone on the GPU --------------------------------------------------------
bench_pass() {  # NAME OUTFILE ARGS...
    local name=$1 out=$2
    shift 2
    run_step "$name" "$PY" -m bench "$@" --plain --no-plot --out "$WORK/$name"
    local rc=$?
    # The JSON is written after every case: a pass cut by its limit keeps what it measured.
    local json
    json=$(ls "$WORK/$name"/*.json 2>/dev/null | head -1)
    [[ -n $json ]] && cp "$json" "$OUTDIR/$out"
    return $rc
}
bench_pass ce bench-ce.json "${CE_SEL[@]}" --rep-ms 50
bench_pass compile bench-compile.json "${COMPILE_SEL[@]}" --rep-ms 50

# --- probes ------------------------------------------------------------------------------
run_step correct "$PY" -m bench.device_probes correct --out "$WORK/probe-correct.json"
run_step host "$PY" -m bench.device_probes host --out "$WORK/probe-host.json"
run_step big "$PY" -m bench.device_probes big --out "$WORK/probe-big.json"
NCU=$(command -v ncu || true)
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/nvidia/nsight-compute/*; do
    [[ -z $NCU && -x $d/ncu ]] && NCU=$d/ncu
done
if [[ -z $NCU ]]; then
    verdict ncu "warn:ncu not found" 0
else
    ncu_ce() {
        local v
        for v in 128256 256000; do
            "$NCU" --profile-from-start off --metrics dram__bytes_read.sum,dram__bytes_write.sum \
                --csv "$PY" -m bench.device_probes ncu-target --vocab "$v" \
                > "$WORK/ncu-$v.csv" 2>&1 || return 1
        done
    }
    export -f ncu_ce
    export NCU PY WORK
    run_step ncu bash -c ncu_ce
fi

# --- BatchNorm and end-to-end, with what remains -----------------------------------------
LIMIT[bn+e2e]=$(left)
bench_pass bn+e2e bench-bn.json "${BN_SEL[@]}"

# --- summary -----------------------------------------------------------------------------
say "== headline numbers"
timeout 30 "$PY" -m bench.device_probes summary "$WORK" --merge "$OUTDIR/probes.json" \
    --bench "$OUTDIR" 2>&1 | tee -a "$SUMMARY"
say "total: $(( $(date +%s) - START )) s (budget ${BUDGET} s); files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
if [[ $FAILED -ne 0 ]]; then
    say "DEVICE CHECK FAILED (see the step lines above)"
    exit 1
fi
say "device check passed"
