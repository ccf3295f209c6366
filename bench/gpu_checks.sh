#!/usr/bin/env bash
# GPU checks in one pass (issues 10 item 7, 11 item 6, 14 item 5): solver speed against mergekit's batch_omp,
# a whole transplant with --device auto, ALM/CE distillation steps and hypernetwork steps, each timed on CUDA;
# issue 22 item 7 (section distill1b): 1B Llama-shaped teacher and student, ZeRO-3 with the teacher sharded,
# gradient checkpointing, 512-token sequences, ALM + CE vs CE step time, tokens/s and peak memory.
#
# Runs on a leased GPU machine over a copy of the tree, which reaches no hub and carries at most 64 MiB, so the
# inputs travel in the git-ignored folder .gpu/ (built here, see bench/RESULTS.md "GPU"):
#   .gpu/whl/*.whl       cp312 wheels of what the machine's image lacks (pydantic, pydantic-core, hjson, ...)
#   .gpu/deepspeed.tgz   the installed deepspeed package (pure Python; its ops JIT-build)
#   .gpu/mk/mergekit_omp mergekit 0.1.5's tokensurgeon/omp.py + rope_helpers.py (the peer solver, unchanged)
#   .gpu/shapes/NAME     config.json + tokenizer files of smollm2-135m, its Mistral-v3 transplant, gemma3-270m
#   .gpu/corpus          1.6 MB of the bundled training text
# Models get random weights of the real shapes (bench/random_models.py): timings only, no quality numbers.
#
#   OUT=/tmp/gpu SMOKE=1 bash bench/gpu_checks.sh     # the same path on CPU, tiny sizes (run before leasing)
#   SECTIONS=distill1b  bash bench/gpu_checks.sh      # only item 7's check (~3 min of CPU as SMOKE=1)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
SMOKE=${SMOKE:-0}
SECTIONS=${SECTIONS:-"solver distill distill1b hypernet transplant"}  # a subset reruns only those
SHAPES=${SHAPES:-.gpu/shapes}  # distill1b: config + tokenizer folders (the CPU smoke can point elsewhere)
TRAIN1B=${TRAIN1B:-"[.gpu/corpus/english.txt,.gpu/corpus/code.txt]"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; TARGETS=256; ANCHORS=4000x128; STEPS=3; MICRO=2; SEQ=128; HN_STEPS=2
else
  DEVICE=cuda; TARGETS=16384; ANCHORS=46000x640; STEPS=20; MICRO=16; SEQ=1024; HN_STEPS=5
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    && tar -xzf .gpu/deepspeed.tgz -C /tmp/site || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"

step() { echo; echo "=== $1 ($(date +%T))"; }

if want solver; then
step "1. solver: ours vs mergekit batch_omp, synthetic $ANCHORS"
timeout 150 python3 bench/bench_solver_vs_mergekit.py --synthetic "$ANCHORS" --total 216000 --targets "$TARGETS" --k 8 64 \
  --device "$DEVICE" --mergekit-src .gpu/mk --runs 3 --check 512 --threads 8 2>&1 | tee "$OUT/solver.md"
fi

if want distill || want hypernet || want transplant; then
step "2. random-weight models of the real shapes"
for name in smollm2 student gemma3; do
  [ "$name" = student ] && ! want distill && continue
  [ "$name" = gemma3 ] && ! want hypernet && ! want transplant && continue
  python3 bench/random_models.py "$SHAPES/$name" "/tmp/m/$name" || exit 1; done
fi

want distill && {
step "4. distillation steps (ALM and CE), one process, bf16"
for loss in alm ce; do
  timeout 120 distill recipes/cpu_smoke_smollm2_mistral.yaml --set output_dir=/tmp/d-$loss --set loss.name=$loss \
    --set teacher.path=/tmp/m/smollm2 --set student.path=/tmp/m/student \
    --set "data.train=[.gpu/corpus/english.txt,.gpu/corpus/code.txt]" --set eval.texts=[] --set eval.teacher=false \
    --set train.steps=$STEPS --set train.micro_batch_size=$MICRO --set train.grad_accum=1 --set data.max_length=$SEQ \
    --set train.embeddings_only_steps=0 --set checkpoint.every=0 --set export.enabled=false \
    --set deepspeed=deepspeed/zero2.json > "$OUT/distill-$loss.log" 2>&1; echo "distill $loss rc=$?"
  cp /tmp/d-$loss/metrics.jsonl "$OUT/distill-$loss.jsonl" 2>/dev/null
  tail -3 "$OUT/distill-$loss.log"
done

}
want distill1b && {
step "6. 1B Llama-shaped teacher and student (issue 22, item 7): ALM + CE vs CE, ZeRO-3 with the teacher sharded too, gradient checkpointing, 512-token sequences"
# SmolLM2-135M's Llama config with Llama-3.2-1B's widths and depth (1.07B parameters with SmolLM2's 49k vocab);
# the teacher keeps SmolLM2's tokenizer, the student is the Mistral-v3 transplant's shape: self-distillation.
if [ "$SMOKE" = 1 ]; then
  WIDE=(--set hidden_size=64 --set intermediate_size=128 --set num_hidden_layers=2 --set num_attention_heads=4
        --set num_key_value_heads=2 --set head_dim=16); ZERO3=recipes/deepspeed/zero3_cpu_test.json; SEQ1B=128; MICRO1B=2
else
  WIDE=(--set hidden_size=2048 --set intermediate_size=8192 --set num_hidden_layers=16 --set num_attention_heads=32
        --set num_key_value_heads=8 --set head_dim=64); ZERO3=recipes/deepspeed/zero3.json; SEQ1B=512; MICRO1B=8
fi
python3 bench/random_models.py "$SHAPES/smollm2" /tmp/m/teacher1b "${WIDE[@]}" || exit 1
python3 bench/random_models.py "$SHAPES/student" /tmp/m/student1b "${WIDE[@]}" || exit 1
printf '| loss | steps timed | median step s | student tokens/s | peak GPU MB | peak RSS MB |\n|---|---|---|---|---|---|\n' \
  > "$OUT/distill1b.md"
for loss in alm ce; do
  timeout 300 distill recipes/cpu_smoke_smollm2_mistral.yaml --set output_dir=/tmp/d1b-$loss --set loss.name=$loss \
    --set teacher.path=/tmp/m/teacher1b --set student.path=/tmp/m/student1b --set teacher.shard=zero3 \
    --set deepspeed=$ZERO3 --set train.gradient_checkpointing=true \
    --set "data.train=$TRAIN1B" --set eval.texts=[] --set eval.teacher=false \
    --set train.steps=$STEPS --set train.micro_batch_size=$MICRO1B --set train.grad_accum=1 --set data.max_length=$SEQ1B \
    --set train.embeddings_only_steps=0 --set checkpoint.every=0 --set export.enabled=false \
    > "$OUT/distill1b-$loss.log" 2>&1; echo "distill1b $loss rc=$?"
  cp /tmp/d1b-$loss/metrics.jsonl "$OUT/distill1b-$loss.jsonl" 2>/dev/null
  python3 - "$OUT/distill1b-$loss.jsonl" "$loss" <<'PY' | tee -a "$OUT/distill1b.md"
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "step_time" in r][1:]  # step 1 warms up
if rows:
    med = lambda key: statistics.median(r.get(key, float("nan")) for r in rows)
    print(f"| {sys.argv[2]} | {len(rows)} | {med('step_time'):.3f} | {med('student_tokens_per_s'):.0f} | "
          f"{max(r.get('peak_gpu_mb', 0) for r in rows):.0f} | {max(r.get('peak_rss_mb', 0) for r in rows):.0f} |")
PY
done

}
want hypernet && {
step "5. hypernetwork training steps (LM loss every step)"
for base in smollm2 gemma3; do
  for shape in "4 64" "32 512"; do
    set -- $shape
    [ "$SMOKE" = 1 ] && set -- 2 32
    timeout 60 python3 bench/bench_hypernet.py --time-steps $HN_STEPS --base /tmp/m/$base --recipe recipes/hypernet_smollm2_cpu.yaml \
      --set corpus=.gpu/corpus --set "real_tokenizers=[]" --set batch_size=$1 --set seq_len=$2 --set threads=8 2>&1 \
      | tail -2 | tee -a "$OUT/hypernet.md"
  done
done
}
want transplant && {
step "3. whole transplant, --device auto (SmolLM2-shaped <- Gemma-3-shaped, 216k new tokens)"
[ "$SMOKE" = 1 ] && METHODS="" || METHODS="fvt-ls omp:8 omp:64"  # 216k targets: minutes on this CPU, skipped
for spec in $METHODS; do
  method=${spec%%:*}; k=${spec#*:}; options=(); [ "$k" != "$spec" ] && options=(--set "k=$k") && spec="$method-k$k"
  started=$(date +%s.%N)
  timeout 150 transplant --base /tmp/m/smollm2 --donor /tmp/m/gemma3 --method "$method" "${options[@]}" \
    -o "/tmp/t-$spec" --eval-bytes 0 --overwrite -v > "$OUT/transplant-$spec.log" 2>&1
  echo "transplant $spec rc=$? wall $(python3 -c "import time; print(round(time.time() - $started, 1))") s" | tee -a "$OUT/transplant.txt"
  grep -vE "it/s\]|s/it\]" "$OUT/transplant-$spec.log" | grep -E "OMP|re-ran|solved|in [0-9.]+s|vocab:|error" | tail -8
done

}
echo "done $(date +%T)"
