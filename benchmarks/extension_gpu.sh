#!/usr/bin/env bash
# Issue 6 on the GPU: the runs BENCHMARKS.md lists under "GPU commands for what is not measured yet",
# trimmed to two device calls of ~3 minutes each on an H100 (estimates from the H100 run there:
# bf16 prefill per needle 0.4 s at 16K / 0.8 s at 32K with a scaling, 1.8 / 2.4 s with Self-Extend,
# ~0.3 s for 24 new tokens, ~20 s per invocation to load the model and tokenize the corpus).
#
#   benchmarks/extension_gpu.sh a     # call 1, ~3.5 min: 32K with kv4 and larger factors; noise haystack
#   benchmarks/extension_gpu.sh b     # call 2, ~2.5 min: perplexity at 16K/32K; gemma3-270m if present
#   benchmarks/extension_gpu.sh c     # noise haystack 32K, 11 depths, Self-Extend with full and kv4; ppl
#   benchmarks/extension_gpu.sh gemma # gemma3-270m at 64K and 128K (4 depths, YaRN and Self-Extend)
#   benchmarks/extension_gpu.sh gemma64|gemma128   # one length, 11 depths: Self-Extend full + kv4, YaRN full
#   benchmarks/extension_gpu.sh gemmappl           # gemma3-270m perplexity at 64K and 128K
#   benchmarks/extension_gpu.sh gemmase            # 32K in-window baseline; Self-Extend 64K, 128K
#   benchmarks/extension_gpu.sh gemmakv4           # Self-Extend + kv4 at 128K (11 depths); its ppl
#
# Needs smollm2-135m in LONGKV_HOME (`benchmarks/sparse_quality.sh model` stages it) and writes one
# JSON-lines file per run plus a log into $OUT. Trimmed from the BENCHMARKS.md list: 6 depths instead
# of 11 (0, 20, ..., 100 %); no `none` rows (0/11 at 16K and 32K already); gemma at 4 depths, 2 ropes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/ext_out}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

ext() {   # NAME ARGS... -> $OUT/NAME.jsonl (runs) and $OUT/NAME.log (everything printed)
  local name=$1 t0=$SECONDS; shift
  echo "+ extension.py $*" >&2
  timeout "${RUN_LIMIT:-280}" $PY benchmarks/extension.py --device "$DEVICE" "$@" --out "$OUT/$name.jsonl" \
    > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - t0)) s; $(tail -n 1 "$OUT/$name.log" | cut -c1-200)" >&2
}

call_a() {
  # 1. smollm2 32K: kv4 on top, and the larger factor / group that 36 % at 32K asks for (48 runs)
  ext ext32k_kv4 --lengths 32768 --depths 6 --caches "full;kv4" \
    --ropes "yarn:factor=4;yarn:factor=8;self-extend:group=8,window=1024;self-extend:group=16,window=2048"
  # 2. RULER's noise haystack, as the DESIGN.md reference (YaRN x4: 2/3 at 29K there) (24 runs)
  ext ext_noise --lengths 16384,32768 --depths 6 --corpus noise \
    --ropes "yarn:factor=4;self-extend:group=8,window=1024"
}

call_b() {
  # 3. perplexity at 16K/32K, 4 windows each, every method; one needle depth keeps the NIAH part short
  ext ext_ppl --lengths 16384,32768 --depths 0.5 --ppl-windows 4 \
    --ropes "none;linear:factor=4;ntk:factor=4;yarn:factor=4;self-extend:group=8,window=1024"
  call_gemma
}

gemma_ok() {
  $PY -c "import sys; from longkv.models.fetch import is_cached; sys.exit(0 if is_cached('gemma3-270m') else 1)" ||
    { echo "gemma3-270m is not in LONGKV_HOME on this machine: skipped (benchmarks/device_setup.sh stages it)" >&2; return 1; }
}

call_gemma() {
  # 4. gemma3-270m (trained to 32K; base model): 64K and 128K, only when its weights are on the machine
  gemma_ok || return 0
  ext gemma64k --model gemma3-270m --lengths 65536 --depths 4 --ropes "yarn:factor=2;self-extend:group=4,window=1024"
  ext gemma128k --model gemma3-270m --lengths 131072 --depths 4 --ropes "yarn:factor=4;self-extend:group=8,window=1024"
}

gemma_grid() {  # LENGTH FACTOR GROUP: 11 depths; Self-Extend with full and kv4, YaRN with full (one run each)
  gemma_ok || return 0
  local n=$(($1 / 1024))
  ext "gemma${n}k_se" --model gemma3-270m --lengths "$1" --depths 11 --caches "full;kv4" \
    --ropes "self-extend:group=$3,window=1024"
  ext "gemma${n}k_yarn" --model gemma3-270m --lengths "$1" --depths 11 --ropes "yarn:factor=$2"
}

call_gemma_se() {  # the in-window baseline at 32K, then Self-Extend at 64K and 128K (full cache), 11 depths
  gemma_ok || return 0
  RUN_LIMIT=70 ext gemma32k_none --model gemma3-270m --lengths 32768 --depths 11 --ropes none
  RUN_LIMIT=170 ext gemma64k_se --model gemma3-270m --lengths 65536 --depths 11 --ropes "self-extend:group=4,window=1024"
  RUN_LIMIT=200 ext gemma128k_se --model gemma3-270m --lengths 131072 --depths 11 --ropes "self-extend:group=8,window=1024"
}

call_gemma_kv4() {  # what the 2026-12-03 device time did not reach: kv4 at 128K, Self-Extend's perplexity
  gemma_ok || return 0
  RUN_LIMIT=240 ext gemma128k_se_kv4 --model gemma3-270m --lengths 131072 --depths 11 --caches kv4 \
    --ropes "self-extend:group=8,window=1024"
  RUN_LIMIT=200 ext gemma_ppl_se --model gemma3-270m --lengths 65536,131072 --depths 0.5 --ppl-windows 1 \
    --ropes "self-extend:group=4,window=1024;self-extend:group=8,window=1024"
}

call_gemma_ppl() {  # perplexity at 64K and 128K, one window each (Shakespeare), per method
  gemma_ok || return 0
  ext gemma_ppl --model gemma3-270m --lengths 65536,131072 --depths 0.5 --ppl-windows 1 --max-new-tokens 8 \
    --ropes "none;yarn:factor=2;yarn:factor=4;self-extend:group=4,window=1024;self-extend:group=8,window=1024"
}

call_c() {
  # 5. the issue's target on the noise haystack: the best method (Self-Extend) at 32K, 11 depths, with kv4 on top
  ext ext_noise32k_kv4 --lengths 32768 --depths 11 --corpus noise --caches "full;kv4" \
    --ropes "self-extend:group=8,window=1024"
  # 6. perplexity at 16K/32K (2 windows each) for none / YaRN x4 / Self-Extend
  ext ext_ppl --lengths 16384,32768 --depths 0.5 --ppl-windows 2 \
    --ropes "none;yarn:factor=4;self-extend:group=8,window=1024"
}

case ${1:-} in
  a) call_a ;;
  b) call_b ;;
  c) call_c ;;
  gemma) call_gemma ;;
  gemma64) gemma_grid 65536 2 4 ;;
  gemma128) gemma_grid 131072 4 8 ;;
  gemmappl) call_gemma_ppl ;;
  gemmase) call_gemma_se ;;
  gemmakv4) call_gemma_kv4 ;;
  smoke)   # CPU check of the plumbing at toy size (real model, 2K tokens)
    DEVICE=cpu ext smoke --lengths 2048 --depths 0.5 --ropes "yarn:factor=2" --caches "kv4" --max-new-tokens 8 ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
ls -la "$OUT"
