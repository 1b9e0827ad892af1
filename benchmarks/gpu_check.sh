#!/usr/bin/env bash
# The GPU check: one command of at most FLOWKERN_GPU_BUDGET_S seconds (default 380; with the set-up and the tables
# under 7 minutes) that always leaves numbers in $OUT (default /tmp/flowkern-gpu). On a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_check.sh            run 1: the headline, correctness, the GPU tests
#   bash benchmarks/gpu_check.sh --rest     run 2 (optional): the whole benchmark suite, autotuned
#   bash benchmarks/gpu_check.sh --dry-run  print the stages and their time limits, run nothing
#
# Run 1, most important first; every stage has its own limit, cut to what is left of the budget:
#   0. the machine: card, driver, versions, commit (gpu.txt), `flowkern info` (info.txt)
#   1. the headline benchmark with pinned configs compiled in parallel (headline.py): one JSON line per case in
#      headline.jsonl, written as each is measured
#   2. correctness at benchmark shapes with autotuning off (gpu_correctness.py -> correctness.log)
#   3. the test suite in parallel shards (gpu_tests.py): SIGINT at the limit so every shard writes its summary
#   4. the tables (summarize.py -> table.md) and the RESULTS.md section (append_results.py)
# Optional wheels (benchmarks/fetch_wheels.sh, e.g. jvp-flash-attention) are installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=run1
for arg in "$@"; do
  case "$arg" in
    --rest) MODE=rest ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$arg' (use --rest, --dry-run or --help)" >&2; exit 2 ;;
  esac
done
BUDGET=${FLOWKERN_GPU_BUDGET_S:-380}
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: error: FLOWKERN_GPU_BUDGET_S must be whole seconds" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/flowkern-gpu}
END=$BUDGET
SECONDS=0
RESERVE=15   # kept back for the tables at the end

PLANNED=0   # --dry-run: the seconds the stages printed so far may take (stands in for the clock)
now() { if [[ -n "${DRY:-}" ]]; then echo "$PLANNED"; else echo "$SECONDS"; fi; }

# limit NAME SECONDS: the stage's limit, cut to what is left of the budget (never below 1)
limit() {
  local left=$((END - $(now) - RESERVE))
  local want=$2
  (( left < want )) && want=$left
  (( want < 1 )) && want=1
  echo "$want"
}

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit (SIGINT first, SIGKILL 10 s later), log the time
  local name=$1 lim=$2; shift 2
  if (( lim < 5 )); then echo "stage $name: skipped, out of budget" | tee -a "$STAGES"; return 0; fi
  if [[ -n "${DRY:-}" ]]; then echo "stage $name: limit ${lim}s: $*"; PLANNED=$((PLANNED + lim)); return 0; fi
  echo "== $name (limit ${lim}s, $((END - SECONDS))s of the budget left)"
  local t0=$SECONDS
  timeout -s INT -k 10 "$lim" "$@"
  local rc=$?
  echo "stage $name: exit $rc after $((SECONDS - t0))s" | tee -a "$STAGES"
  return 0
}

STAGES=/dev/null
if [[ -z "${DRY:-}" ]]; then
  mkdir -p "$OUT"
  STAGES=$OUT/stages.txt
  export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  date $(date -u +%FT%TZ)  mode $MODE"
  } > "$OUT/gpu.txt" 2>&1
  cat "$OUT/gpu.txt"
fi

if [[ $MODE == run1 ]]; then
  stage info "$(limit info 20)" sh -c "python3 -m flowkern info > '$OUT/info.txt' 2>&1"
  LIM=$(limit headline 170)
  stage headline "$LIM" python3 benchmarks/headline.py --out "$OUT/headline.jsonl" \
    --budget-s $(( LIM > 40 ? LIM - 30 : 10 )) --compile-jobs 3
  stage correctness "$(limit correctness 60)" sh -c \
    "FLOWKERN_AUTOTUNE=0 python3 benchmarks/gpu_correctness.py > '$OUT/correctness.log' 2>&1"
  LIM=$(limit tests 160)
  stage tests "$LIM" sh -c "FLOWKERN_AUTOTUNE=0 python3 benchmarks/gpu_tests.py --out '$OUT' --shards 4 \
    --timeout-s $(( LIM > 30 ? LIM - 25 : 5 )) --grace-s 10 -- -m 'not slow' > '$OUT/tests.txt' 2>&1"
else
  stage benchmarks "$(limit benchmarks 380)" python3 -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" -k "${FLOWKERN_BENCH_FILTER:-not smoke}"
fi

if [[ -n "${DRY:-}" ]]; then echo "budget ${BUDGET}s, ${RESERVE}s kept for the tables"; exit 0; fi
python3 benchmarks/summarize.py "$OUT/headline.jsonl" "$OUT/bench.json" > "$OUT/table.md" 2>&1
python3 benchmarks/append_results.py "$OUT" >/dev/null 2>&1 || echo "append_results failed" >> "$OUT/stages.txt"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
echo "== results ($((SECONDS))s in all)"
cat "$OUT/stages.txt" 2>/dev/null
tail -3 "$OUT/tests.txt" 2>/dev/null
tail -6 "$OUT/correctness.log" 2>/dev/null
cat "$OUT/table.md"
