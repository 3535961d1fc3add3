#!/usr/bin/env bash
# bench/decode.py on a CUDA GPU with random-weight models built in memory (no checkpoint on disk).
#
#   OUT=/some/dir bash bench/gpu.sh        # from the repo root; OUT defaults to /tmp
#
# Runs, each under `timeout ${TIMEOUT:-150}` (seconds) and going on when one fails:
#   1. --preset tiny                      -> $OUT/gpu_tiny.json          (plain attention, KVCache)
#   2. --preset small --layers 4          -> $OUT/gpu_small4.json        (MLA, LatentCache)
#   3. --preset tiny --compile            -> $OUT/gpu_tiny_compile.json  (torch.compile'd decode)
# and prints each run's output (stdout+stderr, also kept in $OUT/gpu_*.log).
#
# Needs python3 with CUDA torch, tokenizers, pillow, numpy (PYTHON=... to choose another); the repo
# is put on PYTHONPATH, nothing is installed. The tokenizer: --preset reads tokenizer.json from
# $TOKENIZER if set, else ./.tok if present, else decode.py's default ($DSVL2_TOKENIZER, shared/golden
# in or beside the repo). ../shared does not travel to a device machine, so copy it along first, e.g.
#   mkdir -p .tok && cp ../shared/golden/checkpoints/micro-mha/{tokenizer.json,special_tokens_map.json,processor_config.json} .tok/
#   echo /.tok/ >> .git/info/exclude      # and carry .tok with the run
set -u
OUT=${OUT:-/tmp}
PYTHON=${PYTHON:-python3}
TIMEOUT=${TIMEOUT:-150}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${TOKENIZER:-}" ] && [ -f .tok/tokenizer.json ]; then TOKENIZER=.tok; fi
TOK=()
if [ -n "${TOKENIZER:-}" ]; then TOK=(--tokenizer-from "$TOKENIZER"); fi

"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv 2>/dev/null || true

status=0
run() {  # run NAME ARGS...: one decode.py run, its output printed and logged
  local name=$1
  shift
  echo "=== $name: $PYTHON bench/decode.py $* --json $OUT/$name.json"
  local t0=$SECONDS rc=0
  timeout "$TIMEOUT" "$PYTHON" bench/decode.py "$@" ${TOK[@]+"${TOK[@]}"} --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
  [ "$rc" = 0 ] || status=1
}

run gpu_tiny --preset tiny --device cuda
run gpu_small4 --preset small --layers 4 --device cuda
TIMEOUT=${TIMEOUT_COMPILE:-$TIMEOUT} run gpu_tiny_compile --preset tiny --device cuda --compile
exit $status
