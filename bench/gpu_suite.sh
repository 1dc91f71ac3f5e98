#!/usr/bin/env bash
# The GPU benchmark suite in one call: kernel checks, batch-1 latency, offline throughput.
#   bash bench/gpu_suite.sh quick    kernels + 1B-shape and SmolLM2 figures (~8 min on an H100)
#   bash bench/gpu_suite.sh 8b       Llama-3.1-8B-shape latency, random-256, mixed (~9 min)
#   bash bench/gpu_suite.sh serve    serving at 16 and 32 req/s, traced (RATES, SERVE_FLAGS)
#   bash bench/gpu_suite.sh verify   gpu_check, serving 16 req/s with and without async
#                                    scheduling, 8B batch-1 latency (~9 min)
#   bash bench/gpu_suite.sh int8     random-256 and mixed with the KV cache in bf16, int8 and int4
#                                    (quant_policy 0, 8, 4; QUANTS), the attention kernels each
#                                    way (~9 min)
#   bash bench/gpu_suite.sh profile  where the GPU time goes: batch-1 and both workloads with their
#                                    kernels summed by kind, the GEMV and decode-attention
#                                    launch-setting sweeps, cuBLAS rates (~9 min)
#   bash bench/gpu_suite.sh sweeps   kernel candidates: decode attention over mixed context
#                                    lengths, prefill attention's launch settings (~5 min);
#                                    SHAPES=llama-3.2-1b for head_dim 64
#   bash bench/gpu_suite.sh batch1   batch-1 decode on the 1B and 8B shapes with every step traced:
#                                    device time per step against the gaps between steps (~3 min)
#   MODEL=F.gguf bash bench/gpu_suite.sh smollm2
#                                    a model with real weights (the bundled SmolLM2's GGUF, or
#                                    a model directory): greedy tokens against transformers,
#                                    batch-1 latency, random-256 and mixed (~6 min)
#   bash bench/gpu_suite.sh budget   both workloads at step budgets (max_prefill_token_num)
#                                    BUDGETS (default 4096 8192 16384) (~8 min)
#   AB_BASE="DIR|COMMIT ..." bash bench/gpu_suite.sh ab
#                                    this tree against those in each DIR (or COMMIT of this
#                                    checkout), in turn, REPEATS (2) times per WORKLOADS (mixed
#                                    random-256): machines differ by 1-2%, so changes are
#                                    compared inside one call only (~6 min)
# Results land in $OUT (or ./artifacts) as JSON next to the printed tables.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-artifacts}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SPLITFUSE_BENCH_DIR=${SPLITFUSE_BENCH_DIR:-/tmp/splitfuse-bench}
export SPLITFUSE_CACHE_DIR=${SPLITFUSE_CACHE_DIR:-/tmp/splitfuse-cache}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

# `splitfuse serve` on the 8B shape with every step traced, Poisson arrivals from
# bench/serving.py at each rate, then the trace's summary: serve OUTDIR "FLAGS" "RATES".
serve() {
  local dir=$1 flags=$2 rates=$3 model server
  mkdir -p "$dir"
  model=$(python -c "from bench.common import build_model_dir; print(build_model_dir(None, 'llama-3.1-8b'))" 2>/dev/null | tail -1)
  # shellcheck disable=SC2086
  SPLITFUSE_STEP_TRACE="$dir/steps.jsonl" python -m app.cli serve "$model" --dtype bfloat16 \
    --host 127.0.0.1 --port 23333 --log-level warning $flags > "$dir/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do
    curl -sf http://127.0.0.1:23333/health >/dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "server exited:"; tail -5 "$dir/serve.log"; return 1; }
    sleep 1
  done
  echo "== serving ${flags:-(defaults)}"
  local run=0
  for rate in $rates; do
    run=$((run + 1))  # numbered: a rate given twice (RATES="16 16") keeps both runs
    python bench/serving.py --request-rate "$rate" --num-prompts "${NUM_PROMPTS:-400}" \
      --json "$dir/serving-$run-$rate.json" 2>&1 | tail -7
  done
  kill -TERM "$server"; wait "$server"
  python bench/trace_report.py "$dir/steps.jsonl" --json "$dir/steps-summary.json" | grep -v " n 0 "
}

case "${1:-quick}" in
  quick)
    python bench/gpu_check.py 2>&1 | grep "tokens equal"
    python bench/kernels.py --json "$out/kernels.json" 2>&1 | tail -40
    python bench/latency.py --model-config llama-3.2-1b --dtype bfloat16 --json "$out/latency-1b.json" 2>&1 | tail -6
    python bench/throughput.py --model-config llama-3.2-1b --dtype bfloat16 --workload random-256 \
      --hf-num-prompts 64 --hf-batch-size 64 --json "$out/tp-1b.json" 2>&1 | tail -8
    ;;
  1b)
    python bench/throughput.py --model-config llama-3.2-1b --dtype bfloat16 --workload random-256 \
      --hf-num-prompts 64 --hf-batch-size 64 --json "$out/tp-1b.json" 2>&1 | tail -8
    python bench/latency.py --model-config llama-3.1-8b --dtype bfloat16 --runs 3 --json "$out/latency-8b.json" 2>&1 | tail -6
    ;;
  8b)
    python bench/throughput.py --model-config llama-3.1-8b --dtype bfloat16 --workload random-256 \
      --skip-hf --json "$out/tp-8b-random.json" 2>&1 | tail -8
    python bench/throughput.py --model-config llama-3.1-8b --dtype bfloat16 --workload mixed \
      --hf-num-prompts 32 --hf-batch-size 32 --json "$out/tp-8b-mixed.json" 2>&1 | tail -8
    ;;
  smollm2)
    python bench/gpu_check.py --model "$MODEL" 2>&1 | grep -v "it/s"
    python bench/latency.py --model "$MODEL" --dtype bfloat16 --json "$out/latency-smollm2.json" 2>&1 | tail -6
    for workload in random-256 mixed; do
      python bench/throughput.py --model "$MODEL" --dtype bfloat16 --workload $workload --hf-num-prompts 128 \
        --hf-batch-size 64 --json "$out/tp-smollm2-$workload.json" 2>&1 | tail -8
    done
    ;;
  serve)
    # Online serving on the 8B shape; SERVE_FLAGS adds server flags (e.g. --no-async-scheduling).
    serve "$out" "${SERVE_FLAGS:-}" "${RATES:-16 32}"
    ;;
  verify)
    # After GPU-side changes: correctness, serving with and without async scheduling, batch-1.
    python bench/gpu_check.py 2>&1 | grep "tokens equal"
    serve "$out/serve-async" "" 16
    serve "$out/serve-plain" --no-async-scheduling 16
    python bench/latency.py --model-config llama-3.1-8b --dtype bfloat16 --runs 3 --skip-hf \
      --json "$out/latency-8b.json" 2>&1 | tail -4
    ;;
  int8)
    # The quantized KV caches against the bf16 one in the same call.
    for workload in random-256 mixed; do
      for quant in ${QUANTS:-0 8 4}; do
        python bench/throughput.py --model-config llama-3.1-8b --dtype bfloat16 --skip-hf \
          --workload $workload --quant-policy $quant --json "$out/tp-8b-$workload-q$quant.json" \
          2>&1 | grep -i "idle\|pool\|^splitfuse  "
      done
    done
    python bench/kernels.py --only decode,prefill --json "$out/kernels-attn.json" 2>&1 | tail -30
    ;;
  profile)
    python bench/latency.py --model-config llama-3.1-8b --dtype bfloat16 --runs 3 --skip-hf \
      --profile 2>&1 | grep -v -i "warn\|loading" | tail -28
    for workload in random-256 mixed; do
      python bench/throughput.py --model-config llama-3.1-8b --dtype bfloat16 --skip-hf \
        --workload $workload --profile --json "$out/profile-$workload.json" 2>&1 \
        | grep -v -i "warn\|loading" | tail -30
    done
    python bench/kernels.py --only gemv-sweep,gemm 2>&1 | grep -v "^kernel\|^$\|^  timed " | tail -40
    python bench/kernels.py --only decode-sweep 2>&1 | grep -v "^kernel\|^$\|^  timed " | tail -40
    ;;
  batch1)
    for shape in llama-3.2-1b llama-3.1-8b; do
      echo "== $shape, traced"
      SPLITFUSE_STEP_TRACE="$out/steps-$shape.jsonl" python bench/latency.py --model-config "$shape" \
        --dtype bfloat16 --runs 2 --skip-hf 2>&1 | tail -1
      python bench/trace_report.py "$out/steps-$shape.jsonl" --json "$out/steps-$shape.json" \
        | grep -v " n 0 "
    done
    ;;
  sweeps)
    python bench/kernels.py --shapes "${SHAPES:-llama-3.1-8b}" \
      --only decode-ragged,prefill-sweep 2>&1 | grep -v "^kernel\|^$\|compiled\|^  timed " \
      | tail -120
    ;;
  ab)
    here=$(pwd) trees=() names=()
    for base in ${AB_BASE:?AB_BASE names the trees or commits to compare with}; do
      dir=$base
      if [ ! -d "$dir" ]; then
        dir=$(mktemp -d)
        git archive "$base" | tar -x -C "$dir" || { echo "no tree or commit $base"; exit 1; }
      fi
      trees+=("$dir") names+=("$base")
    done
    trees+=("$here") names+=("this tree")
    for workload in ${WORKLOADS:-mixed random-256}; do
      for i in $(seq "${REPEATS:-2}"); do
        for t in "${!trees[@]}"; do
          echo "== $workload, run $i, ${names[$t]}"
          (cd "${trees[$t]}" && python bench/throughput.py --model-config llama-3.1-8b \
            --dtype bfloat16 --skip-hf --workload "$workload" 2>&1 | grep -i "idle\|^splitfuse  ")
        done
      done
    done
    ;;
  budget)
    # A smaller budget puts more decode rows beside the prompts of each admission step, a larger
    # one admits in fewer, longer steps.
    for workload in mixed random-256; do
      for budget in ${BUDGETS:-4096 8192 16384}; do
        echo "== $workload, max_prefill_token_num $budget"
        python bench/throughput.py --model-config llama-3.1-8b --dtype bfloat16 --skip-hf \
          --workload $workload --max-prefill-token-num "$budget" \
          --json "$out/tp-8b-$workload-b$budget.json" 2>&1 | grep -i "idle\|^splitfuse  "
      done
    done
    ;;
esac
