#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA extension, run the whole test suite on the GPU,
# run the op / training-step / NVIDIA-peer benchmarks, and leave everything under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                 # every step, ~9.5 minutes at most
#   OUT=/some/dir bash benchmarks/gpu_check.sh bench peer      # only some steps
#   BENCH_ARGS="--batch 16 --dtype bf16" bash benchmarks/gpu_check.sh bench
#
# All steps in one 10-minute call squeeze the later ones. A session's device time (15 minutes,
# the machine's start included) holds one full call and a short one made straight after it,
# while the machine is warm (benchmarks/RESULTS.md has the knobs):
#   bash benchmarks/gpu_check.sh build tests bench train;  then  bash benchmarks/gpu_check.sh peer
# Carry .peer (git-ignored, NVIDIA's checkout) to both calls: the build step then compiles
# NVIDIA's two plugins beside the extension (into build/torch_extensions, which the machine
# keeps between calls), so the peer step measures at once instead of compiling first. The
# peer step runs two comparisons (per op, then NVIDIA's whole G and D) and runs before train
# when both are asked for.
#
# Steps: build tests bench networks train peer (default: all, in that order), and the opt-in
# codegen (this machine's Triton compiles the kernels for sm_90 and benchmarks/codegen.py reads
# the machine code; it runs nothing on the GPU) and host (benchmarks/host_overhead.py: host
# time per eager call of each fast op, through the dispatcher and directly). Each step runs
# under its own time limit and a failing step never stops the next one; the exit status is
# that of the worst step. Everything is tee'd into $OUT/gpu_check.log as it happens, so a
# timeout loses nothing already printed. $OUT ends up with at most 13 files:
#   gpu_check.log  test_logs.tar.gz  gpu_tests.json  results.tar.gz (benchmarks/results/
#   <device>-<date>/, gpu_tests.json included)  targets.md  ops.md  networks.md  train_step.md
#   peer_nvidia.md  peer_networks.md  codegen.md  host_overhead.md  summary.txt
# Knobs (environment): GPU_CHECK_SECONDS (total, default 560), TESTS_SECONDS (default 200),
# TEST_PROCESSES (test processes at a time, default twice the cores), TEST_FILES (default:
# every tests/test_*.py but the codegen checks), TESTS_PER_SHARD (default 40),
# BENCH_SECONDS (op benchmark budget, default 180), NETWORKS_SECONDS (default 60),
# TRAIN_SECONDS (default 90), CODEGEN_SECONDS (default 240), HOST_SECONDS (default 90),
# PEER_NETWORKS_SECONDS (the peer step's share for NVIDIA's whole networks, default 180),
# BENCH_ARGS / NETWORKS_ARGS / HOST_ARGS / TRAIN_ARGS / PEER_ARGS / PEER_NETWORKS_ARGS (extra
# arguments), NVIDIA_PATH (default: .peer/stylegan3 or .peer/stylegan2-ada-pytorch),
# RESULTS_DIR (default benchmarks/results/<device>-<date>), PYTHON (default python3).
set -u -o pipefail

cd "$(dirname "$0")/.."
STEPS=${*:-build tests bench networks train peer}
# A mistyped step ("bnech") used to match nothing: the script ran no step and exited 0.
for step in $STEPS; do
    case $step in
    build | tests | bench | networks | train | peer | codegen | host) ;;
    *)
        echo "gpu_check.sh: unknown step '$step'; steps: build tests bench networks train peer codegen host" >&2
        exit 2
        ;;
    esac
done
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# Unbuffered, so a step killed by its time limit has already logged what it printed.
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
# NVIDIA's plugins (peer step) are cached in the repo's ignored build/, which the device machine
# keeps between calls (a carried .peer would replace anything kept inside it).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/build/torch_extensions}
# Hopper only (H100 / H200): one architecture keeps the build short.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-560}))
WORST=0
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }
# min(wanted, time left - reserve), at least 10 s
allot() {
    local wanted=$1 reserve=$2 remain
    remain=$(($(left) - reserve))
    ((remain < wanted)) && wanted=$remain
    ((wanted < 10)) && wanted=10
    echo "$wanted"
}
want() { [[ " $STEPS " == *" $1 "* ]]; }
# run_step NAME SECONDS CMD...: time-limited, tee'd, status recorded; never aborts the script
run_step() {
    local name=$1 seconds=$2 rc
    shift 2
    log "step $name: start (limit ${seconds}s): $*"
    # SIGINT first: pytest then writes its junit XML and summary, the benchmark scripts write
    # what they measured so far; SIGKILL 20 s later if that hangs.
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137 || rc == 130)); then
        log "step $name: TIMED OUT after ${seconds}s"
    else
        log "step $name: exit $rc"
    fi
    echo "$name: exit $rc$( ((rc == 124 || rc == 137 || rc == 130)) && echo ' (time limit)')" >>"$SUMMARY"
    ((rc > WORST)) && WORST=$rc
    return 0
}

log "repo $REPO, OUT $OUT, steps: $STEPS"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
    git log -1 --format='commit %H %s' 2>&1
    git status --short 2>&1 | head -20
} | tee -a "$LOG"
# Without a GPU every step still runs, on the CPU: say so at the top of the log and the summary
# instead of leaving it to a "GPU None" in the version line.
if [[ $("$PYTHON" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null) != True ]]; then
    log "WARNING: no GPU visible to torch: every step runs on the CPU; its timings are CPU (not comparable) and targets.py judges none of them"
    echo "no GPU visible: CPU timings (not comparable), no target judged" >>"$SUMMARY"
fi

TEST_FILES=${TEST_FILES:-$(ls tests/test_*.py | grep -v "tests/test_kernel_codegen.py")}
COLLECTED=$OUT/tests/collected.txt  # packed with the test logs
rm -rf "$OUT/tests"
mkdir -p "$OUT/tests"
# shellcheck disable=SC2086
collect_tests() { "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider $TEST_FILES >"$COLLECTED" 2>&1; }

NVIDIA_PATH=${NVIDIA_PATH:-}
if [[ -z "$NVIDIA_PATH" ]]; then
    for candidate in .peer/stylegan3 .peer/stylegan2-ada-pytorch; do
        [[ -d $candidate/torch_utils ]] && NVIDIA_PATH=$candidate && break
    done
fi

if want build; then
    # NVIDIA's two plugins compile beside the extension (CPU work, a minute or two), so that
    # a peer step, in this call or the next, measures at once instead of compiling first.
    plugins_pid=
    if [[ -n "$NVIDIA_PATH" ]]; then
        log "step build: compiling NVIDIA's plugins from $NVIDIA_PATH in the background"
        timeout --kill-after=20 "$(allot 300 200)" "$PYTHON" benchmarks/peer_nvidia.py \
            --nvidia-path "$NVIDIA_PATH" --prepare >"$OUT/nvidia_plugins.log" 2>&1 &
        plugins_pid=$!
    fi
    extension_fresh() {
        local so
        so=$(ls batikfast/_C*.so 2>/dev/null | head -1)
        [[ -n "$so" ]] && [[ -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ]]
    }
    if extension_fresh; then
        log "step build: batikfast/_C is newer than csrc/, not rebuilding"
        echo "build: up to date" >>"$SUMMARY"
    else
        run_step build "$(allot 300 240)" "$PYTHON" setup.py build_ext --inplace
    fi
    "$PYTHON" -m batikfast.info 2>&1 | tee -a "$LOG"
    # The tests step's plan needs the suite's test ids: listed now, while the plugins compile.
    want tests && collect_tests &
    if [[ -n "$plugins_pid" ]]; then
        wait "$plugins_pid"
        rc=$?
        log "step build: NVIDIA's plugins: exit $rc"
        ((rc == 0)) && mkdir -p "$TORCH_EXTENSIONS_DIR" &&
            touch "$TORCH_EXTENSIONS_DIR/nvidia_plugins.ready"
        cat "$OUT/nvidia_plugins.log" >>"$LOG" && rm "$OUT/nvidia_plugins.log"
        echo "nvidia plugins: exit $rc" >>"$SUMMARY"
    fi
    wait  # the test listing
fi

if want tests; then
    # Processes run at once, up to twice the cores: one per test file, and a file of many tests
    # split into shards (benchmarks/gpu_tests.py plan; pytest --shard I/N), largest first. On a
    # GPU each distinct Triton specialisation a file launches compiles (hundreds for bias_act),
    # a CPU-bound second or so each: one process per file left those files compiling on one
    # core past the time limit while the other cores idled. A crash (segfault) in one process
    # cannot hide the others' results, and faulthandler names the test that crashed.
    # Benchmarks run only after every test process has ended, so they are not disturbed.
    # Not test_kernel_codegen: it compiles for sm_80 / sm_90 without using the GPU (minutes of
    # CPU work that CI does on every commit); here it would only take cores from the GPU tests.
    [[ -s "$COLLECTED" ]] || collect_tests
    seconds=$(allot "${TESTS_SECONDS:-200}" 150)
    step_end=$(($(date +%s) + seconds))
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/gpu_tests.py plan "$COLLECTED" $TEST_FILES \
        --per-shard "${TESTS_PER_SHARD:-40}" >"$OUT/tests/plan.txt"
    parallel=${TEST_PROCESSES:-$((2 * $(nproc)))}
    # torch's CPU threads split among the processes: 32 processes of 16 threads each only
    # contend (the CPU-bound tests: training loops, DDP over gloo, the references).
    threads=$(($(nproc) / parallel))
    ((threads < 1)) && threads=1
    log "step tests: $(wc -l <"$OUT/tests/plan.txt") processes for $(echo $TEST_FILES | wc -w) files, $parallel at a time, OMP_NUM_THREADS=$threads each, all ended by ${seconds}s (CPU-only codegen checks left to CI)"
    running=0
    while read -r file index count; do
        shard_log="$OUT/tests/$(basename "$file" .py).$index-of-$count.log"
        remain=$((step_end - $(date +%s)))
        if ((remain < 10)); then
            echo "not started: the step's time was up" >"$shard_log"
            continue
        fi
        OMP_NUM_THREADS=$threads timeout --signal=INT --kill-after=20 "$remain" "$PYTHON" \
            -X faulthandler -m pytest -q -ra -p no:cacheprovider "$file" --shard "$index/$count" \
            >"$shard_log" 2>&1 &
        running=$((running + 1))
        if ((running >= parallel)); then
            wait -n
            running=$((running - 1))
        fi
    done <"$OUT/tests/plan.txt"
    wait
    "$PYTHON" benchmarks/gpu_tests.py summarise "$OUT/tests" --json "$OUT/gpu_tests.json" |
        tee -a "$LOG" "$SUMMARY"
    tar -czf "$OUT/test_logs.tar.gz" -C "$OUT" tests && rm -r "$OUT/tests"
fi

if [[ -z "${RESULTS_DIR:-}" ]]; then
    RESULTS_DIR=$("$PYTHON" -c "import sys; sys.path.insert(0, '.'); from benchmarks.common import default_device, output_dir; print(output_dir(None, default_device()))")
fi
mkdir -p "$RESULTS_DIR"
log "results folder: $RESULTS_DIR"
[[ -f "$OUT/gpu_tests.json" ]] && cp "$OUT/gpu_tests.json" "$RESULTS_DIR/gpu_tests.json"

if want bench; then
    budget=$(allot "${BENCH_SECONDS:-180}" 110)
    # --budget stops new measurements; the hard limit leaves time to write the outputs.
    # shellcheck disable=SC2086
    run_step bench $((budget + 60)) "$PYTHON" benchmarks/run.py --budget "$budget" --rep-ms 50 \
        --outdir "$RESULTS_DIR" ${BENCH_ARGS:-}
fi

if want networks; then
    budget=$(allot "${NETWORKS_SECONDS:-60}" 60)
    # shellcheck disable=SC2086
    run_step networks $((budget + 60)) "$PYTHON" benchmarks/networks.py --budget "$budget" \
        --rep-ms 50 --outdir "$RESULTS_DIR" ${NETWORKS_ARGS:-}
fi

if want peer; then
    if [[ -n "$NVIDIA_PATH" ]]; then
        # Two runs: per op, then whole networks; the ops run keeps the networks run's share
        # (by default 180 s, or 40% of the time left when less than 450 s is).
        default_share=$(($(left) * 2 / 5))
        ((default_share > 180)) && default_share=180
        networks_share=${PEER_NETWORKS_SECONDS:-$default_share}
        limit=$(allot 300 $((networks_share + 20)))
        # Unless a build step has compiled their two plugins (in this call or an earlier one on
        # this machine), they JIT-compile first: a minute or two, not under --budget.
        reserve=150
        [[ -f "$TORCH_EXTENSIONS_DIR/nvidia_plugins.ready" ]] && reserve=40
        # shellcheck disable=SC2086
        run_step peer "$limit" "$PYTHON" benchmarks/peer_nvidia.py --nvidia-path \
            "$NVIDIA_PATH" --budget $((limit > reserve + 30 ? limit - reserve : 30)) --batch 64 \
            --dtype fp16 --rep-ms 50 --outdir "$RESULTS_DIR" ${PEER_ARGS:-}
        # NVIDIA's G and D with batikfast's, same weights. The plugins load from the build
        # above; the budget leaves the time of one measurement in flight (a batch-64 first call
        # tunes cuDNN) and the writing, or a rebuild when the run above was stopped mid-build.
        limit=$(allot "$networks_share" 20)
        # shellcheck disable=SC2086
        run_step peer_networks "$limit" "$PYTHON" benchmarks/peer_networks.py --nvidia-path \
            "$NVIDIA_PATH" --budget $((limit > 120 ? limit - 90 : 30)) --rep-ms 50 \
            --outdir "$RESULTS_DIR" ${PEER_NETWORKS_ARGS:-}
    else
        log "step peer: skipped, no NVIDIA checkout in .peer/ (carry .peer to run it)"
        echo "peer: skipped (no .peer/stylegan3)" >>"$SUMMARY"
    fi
fi

if want train; then
    budget=$(allot "${TRAIN_SECONDS:-90}" 70)
    # Mixed precision first: the paper's setting. Each setup runs 16 warm-up + 32 timed steps,
    # then one profiled cycle: the kernels that take the step's time, for the analysis.
    # shellcheck disable=SC2086
    run_step train $((budget + 60)) "$PYTHON" benchmarks/train_step.py --budget "$budget" \
        --precision mixed fp32 --cycles 2 --profile --outdir "$RESULTS_DIR" ${TRAIN_ARGS:-}
fi

if want codegen; then
    # Opt-in (not a default step; no GPU needed): what this machine's Triton compiles the
    # generator's kernels to for sm_90, beside the committed report from CI's Triton.
    # shellcheck disable=SC2086
    run_step codegen "$(allot "${CODEGEN_SECONDS:-240}" 20)" "$PYTHON" benchmarks/codegen.py \
        --arch 90 --shapes paper256-g --batch 16 --dtype fp16 --modes fwd+bwd \
        --outdir "$RESULTS_DIR" ${CODEGEN_ARGS:-}
fi

if want host; then
    # Opt-in: tiny shapes, so each figure is host time; the first calls compile the Triton
    # specialisations of the tiny cases.
    # shellcheck disable=SC2086
    run_step host "$(allot "${HOST_SECONDS:-90}" 20)" "$PYTHON" benchmarks/host_overhead.py \
        --outdir "$RESULTS_DIR" ${HOST_ARGS:-}
fi

if [[ -d "$RESULTS_DIR" ]]; then
    # The three targets' verdicts from the JSON just written (GPU results only).
    "$PYTHON" benchmarks/targets.py "$RESULTS_DIR" >/dev/null 2>>"$LOG" ||
        log "targets.py failed (see above); the JSON is intact"
    tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RESULTS_DIR")" "$(basename "$RESULTS_DIR")"
    for name in targets.md ops.md networks.md train_step.md peer_nvidia.md peer_networks.md \
        codegen.md host_overhead.md; do
        [[ -f "$RESULTS_DIR/$name" ]] && cp "$RESULTS_DIR/$name" "$OUT/$name"
    done
fi
rmdir "$OUT/tests" 2>/dev/null
log "done in $(($(date +%s) - START)) s; worst exit status $WORST"
cat "$SUMMARY" | tee -a "$LOG"
exit "$WORST"
