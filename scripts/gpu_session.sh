#!/usr/bin/env bash
# One batched GPU session (through the device tool). STAGES picks what runs (default: all):
#   check    the whole test suite on the GPU(s), and beside it (correctness only, no timing)
#            `aphro parity-check --tp N` of every family in bf16 for N = 2, 4, .. up to the GPUs
#   perf     `aphro bench throughput` (engine beside HF generate_batch / generate) for each of BENCH_PRESETS,
#            then `aphro bench latency` at batch 1 on the Llama-3-8B shape, TP 1 .. GPUs
# Logs and JSON go to $OUT; a short table is printed last.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/aphro-gpu}; mkdir -p "$OUT"
TMP=$(mktemp -d)  # exit codes and stderr: the device tool brings back at most 8 files of $OUT
STAGES=${STAGES:-check perf}
GPUS=$(nvidia-smi -L | wc -l)
APHRO="python3 -m aphro_cli.main"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0],
'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; }  # (the device copy's .git can be stale: take the commit from the caller's side) | tee "$OUT/machine.txt"

summary=()
if [[ " $STAGES " == *" check "* ]]; then
  pids=()
  for ((tp = 2; tp <= GPUS; tp *= 2)); do
    ( timeout -s ABRT "${PARITY_TIMEOUT:-480}" $APHRO parity-check --tp $tp --dtype bfloat16 --json \
        > "$OUT/parity-tp$tp.json" 2> "$TMP/parity-tp$tp.err"; echo $? > "$TMP/parity-tp$tp.rc" ) &
    pids+=($!)
  done
  per_test=""  # pytest-timeout (in the GPU image): a hung test fails alone, with its stacks
  python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout ${TEST_TIMEOUT:-200}"
  timeout -s ABRT "${PYTEST_TIMEOUT:-500}" python3 -m pytest -q -rfEs -p no:cacheprovider --durations=15 \
    $per_test ${PYTEST_ARGS:-tests} > "$OUT/pytest.log" 2>&1
  summary+=("pytest (rc $?): $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)")
  wait "${pids[@]}" 2>/dev/null
  for ((tp = 2; tp <= GPUS; tp *= 2)); do
    summary+=("$(python3 - "$OUT/parity-tp$tp.json" "$(cat "$TMP/parity-tp$tp.rc")" $tp <<'PY'
import json, sys
path, rc, tp = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"parity-check --tp {tp}: rc {rc}, no report ({e})"); sys.exit()
bad = sorted({x["model"] for x in r["reports"] if not x["passed"]} | set(r["errors"]))
ok = sorted({x["model"] for x in r["reports"] if x["passed"]} - set(bad))
shard = r.get("sharding", {})
print(f"parity-check --tp {tp} bf16: {len(ok)}/{len(ok) + len(bad)} pass HF parity"
      f"{' (failed: ' + ', '.join(bad) + ')' if bad else ''}; sharding ok "
      f"{sum(s['ok'] for s in shard.values())}/{len(shard)}")
PY
)")
  done
fi

if [[ " $STAGES " == *" perf "* ]]; then
  for preset in ${BENCH_PRESETS:-llama-1b}; do
    timeout "${BENCH_TIMEOUT:-240}" $APHRO bench throughput --model-config "$preset" \
      --num-prompts "${NUM_PROMPTS:-64}" --input-len "${INPUT_LEN:-512}" \
      --output-len "${OUTPUT_LEN:-128}" --json "$OUT/bench-$preset.json" \
      > "$TMP/bench-$preset.log" 2>&1
    summary+=("$(python3 - "$OUT/bench-$preset.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("bench throughput failed:", e); sys.exit()
w, rows, roof = r["workload"], {x["name"]: x for x in r["results"]["rows"]}, r["roofline"] or {}
line = (f"throughput {r['model']['name']} {r['model']['dtype']} {w['num_prompts']}x"
        f"{w['max_input_len']}+{w['output_len']}: engine {rows['aphro']['output_tok_s']:.0f} tok/s")
for name in ("HF generate_batch", "HF generate"):
    if rows.get(name, {}).get("output_tok_s"):
        line += f", {name} {rows[name]['output_tok_s']:.0f} ({rows[name]['ratio']:.2f}x)"
if roof:
    line += f"; {roof['fraction']:.0%} of the {roof['output_tok_s']:.0f} tok/s roofline"
print(line + f", KV {r['results']['engine']['kv_blocks']} blocks")
PY
)")
  done
  tps=""; for ((tp = 1; tp <= GPUS; tp *= 2)); do tps+=" --tp $tp"; done
  timeout "${LATENCY_TIMEOUT:-240}" $APHRO bench latency --preset llama-8b $tps \
    --json "$OUT/latency.jsonl" > "$OUT/latency.log" 2>&1
  summary+=("latency (rc $?): $(python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); t = r['results']['tpot']
    print(f\"tp={r['workload']['tp']} TPOT p50 {t['p50_ms']:.3f} ms, TTFT p50 {r['results']['ttft']['p50_ms']:.1f} ms;\", end=' ')
" "$OUT/latency.jsonl" 2>&1)")
fi

echo; echo "== summary"; printf '%s\n' "${summary[@]}"
