#!/usr/bin/env bash
# GPU measurements with random-weight models built in memory (no checkpoint on disk): the static decode
# step eager vs CUDA graphs, the serving load test, and bench/decode.py.
#
#   OUT=/some/dir bash bench/gpu.sh        # from the repo root; OUT defaults to /tmp
#   PARTS="graphs static load" OUT=$OUT bash bench/gpu.sh   # the serving-engine checks only
#
# Runs, each under `timeout ${TIMEOUT:-150}` (seconds) and going on when one fails; PARTS (default
# "graphs static load decode") chooses which groups run, in this order:
#   graphs: pytest tests/test_static_decode.py -k cuda (CUDA-graph replay = eager; needs pytest) -> $OUT/gpu_graphs_test.log
#   static: bench/static_decode.py --preset tiny          -> $OUT/gpu_static_tiny.json   (eager vs CUDA graphs, b 1..32)
#           bench/static_decode.py --preset small --layers 4 -> $OUT/gpu_static_small4.json (MLA)
#   load:   bench/loadtest.py --preset tiny, 256 requests, 64 clients, 64 slots -> $OUT/gpu_load_tiny.json
#   decode: bench/decode.py --preset tiny / small --layers 4 / tiny --compile -> $OUT/gpu_{tiny,small4,tiny_compile}.json
# and prints each run's output (stdout+stderr, also kept in $OUT/gpu_*.log). With 15 minutes of device
# time, PARTS="graphs static load" fits (about 6-8 minutes, untested: written without a GPU).
#
# Needs python3 with CUDA torch, tokenizers, pillow, numpy (load: also fastapi, uvicorn, httpx; graphs:
# pytest) (PYTHON=... to choose another); the repo
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
run() {  # run NAME SCRIPT ARGS...: one bench script run, its output printed and logged
  local name=$1 script=$2
  shift 2
  echo "=== $name: $PYTHON $script $*"
  local t0=$SECONDS rc=0
  timeout "$TIMEOUT" "$PYTHON" "$script" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
  [ "$rc" = 0 ] || status=1
}
PARTS=${PARTS:-graphs static load decode}

for part in $PARTS; do
  case $part in
    graphs)
      run gpu_graphs_test -m pytest -q -p no:cacheprovider tests/test_static_decode.py -k cuda -rs ;;
    static)
      run gpu_static_tiny bench/static_decode.py --preset tiny --device cuda --json "$OUT/gpu_static_tiny.json"
      run gpu_static_small4 bench/static_decode.py --preset small --layers 4 --device cuda \
        --json "$OUT/gpu_static_small4.json" ;;
    load)
      run gpu_load_tiny bench/loadtest.py --preset tiny --device cuda --dtype bf16 --requests 256 --clients 64 \
        --max-batch-size 64 --max-tokens 16,128 ${TOK[@]+"${TOK[@]}"} --json "$OUT/gpu_load_tiny.json" ;;
    decode)
      run gpu_tiny bench/decode.py --preset tiny --device cuda ${TOK[@]+"${TOK[@]}"} --json "$OUT/gpu_tiny.json"
      run gpu_small4 bench/decode.py --preset small --layers 4 --device cuda ${TOK[@]+"${TOK[@]}"} \
        --json "$OUT/gpu_small4.json"
      TIMEOUT=${TIMEOUT_COMPILE:-$TIMEOUT} run gpu_tiny_compile bench/decode.py --preset tiny --device cuda --compile \
        ${TOK[@]+"${TOK[@]}"} --json "$OUT/gpu_tiny_compile.json" ;;
    *) echo "unknown part $part (graphs static load decode)"; status=1 ;;
  esac
done
exit $status
