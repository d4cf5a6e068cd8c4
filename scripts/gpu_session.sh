#!/usr/bin/env bash
# One batched GPU session (through the device tool): the whole test suite on CUDA, then the engine
# beside HF generate on a random-weight Llama. Prints a short table last; logs go to $OUT.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/aphro-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest.log" | tail -15
for preset in ${BENCH_PRESETS:-llama-1b}; do
  timeout ${BENCH_TIMEOUT:-240} python3 -m aphro_cli.main bench throughput --preset "$preset" \
    --num-prompts ${NUM_PROMPTS:-64} --input-len ${INPUT_LEN:-512} --output-len ${OUTPUT_LEN:-128} \
    --json > "$OUT/bench-$preset.json" 2> "$OUT/bench-$preset.err" || tail -5 "$OUT/bench-$preset.err"
  python3 - "$OUT/bench-$preset.json" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().split("\n", 0)[0][open(sys.argv[1]).read().index("{"):])
except Exception as e:
    print("bench failed:", e); sys.exit(0)
print(f"{r['model'][-20:]:20s} {r['dtype']} {r['num_prompts']}x{r['input_len']}+{r['output_len']}: "
      f"engine {r['engine_output_tok_s']:.0f} tok/s ({r['engine_s']:.2f}s), "
      f"HF {r['hf_output_tok_s']:.0f} tok/s ({r['hf_s']:.2f}s), speedup {r['speedup']:.2f}x, "
      f"KV blocks {r['kv_blocks']}")
PY
done
