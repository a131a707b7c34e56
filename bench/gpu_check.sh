#!/usr/bin/env bash
# The checks lorasft cannot run on its 2-core CPU, as one script under 12 minutes on one GPU.
# Figures go to $OUT/gpu_check.txt (each step's output) and $OUT/gpu_check.json (the rows).
#
#   bash bench/gpu_check.sh --prepare   # here, with pip access: writes .gpu/ (about 20 MB)
#   bash bench/gpu_check.sh             # there, on the GPU machine, from the repository root
#
# --prepare puts in .gpu/ what a bare GPU image lacks and nothing can fetch there: the default
# model's config and tokenizer (its weights, a 94 MB GGUF, are over what travels, so the GPU run
# trains a randomly initialised SmolLM2-135M: speed and memory figures are the real model's,
# loss and long-context quality figures are not) and wheels of the Python packages lorasft needs
# in the versions it is tested with. lorasft itself runs from src/ (PYTHONPATH).
#
# Steps (each bounded by `timeout`, their limits adding up to 11 minutes with setup; each
# reported even when it fails):
#   1. environment: GPU, torch, transformers, flash-attn
#   2. bench/speed/train_speed.py --device cuda: naive / lorasft / packed tokens/s, peak memory, MFU
#   3. flash attention varlen packing: a short `lorasft train` with data.packing and
#      flash_attention_2 (flattened batches), then the same with S2-Attn around flash attention;
#      "not run" when flash-attn is not installed
#   4. bench/long_context/long_step.py at 16384 tokens: full attention vs S2-Attn step time and peak memory
#      (torch.cuda.max_memory_allocated) against `lorasft plan`
#   5. a short 16k S2-Attn training (one stage at 16384) with the long-context evaluation after it
#   6. vLLM behind `lorasft serve --engine vllm`: verify --url and serve_load (when installed)
#   7. FSDP with torchrun on every GPU of the node, when there is more than one
# GPU_CHECK_SMOKE=1 runs every step at toy sizes (minutes on a CPU; to test this script).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU=$ROOT/.gpu

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p "$GPU/model" "$GPU/whl"
  "$PY" - "$GPU/model" <<'EOF'
import shutil, sys
from pathlib import Path
from lorasft.model.load import resolve_model_path
src, dst = resolve_model_path("default"), Path(sys.argv[1])
for f in src.iterdir():
    if f.suffix in (".json", ".txt", ".jinja") and "model.safetensors" not in f.name:
        shutil.copy(f, dst / f.name)
print("model files:", sorted(p.name for p in dst.iterdir()))
EOF
  # The versions of this project's tested environment (this venv); the GPU image's torch, numpy,
  # pyarrow, pandas, huggingface_hub, tokenizers and safetensors are used as they are there.
  fresh=$(mktemp -d)  # a failed download leaves the previous set in place, not half of one
  for name in transformers peft accelerate datasets pydantic pydantic-core annotated-types \
              typing-inspection dill multiprocess gguf sacrebleu portalocker; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$fresh" "$name==$version"
  done
  rm -rf "$GPU/whl" && mv "$fresh" "$GPU/whl"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  du -sh "$GPU"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.txt
JSON=$OUT/gpu_check.json
: > "$LOG"
: > "$JSON"
SMOKE=${GPU_CHECK_SMOKE:-0}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [[ -d "$GPU/whl" ]] && ls "$GPU"/whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/lorasft-site \
       "$GPU"/whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH=/tmp/lorasft-site
  else
    echo "warning: the wheels in .gpu/whl did not install (they are built for Python 3.12);" \
         "using this machine's packages" | tee -a "$LOG"
  fi
fi
export PYTHONPATH=$ROOT/src:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: run, log, keep going
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - start))" >> "$JSON"
}

# A randomly initialised SmolLM2-135M (config and tokenizer from --prepare) in bf16.
MODEL=$OUT/smollm2-random
"$PY" - "$GPU/model" "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not (src / "config.json").is_file():
    sys.exit(f"{src}: no config.json; run `bash bench/gpu_check.sh --prepare` where pip works")
import os
torch.manual_seed(0)
config = AutoConfig.from_pretrained(src)
if os.environ.get("GPU_CHECK_SMOKE") == "1":  # toy sizes: 2 layers, a 256-token window
    config.num_hidden_layers, config.max_position_embeddings = 2, 256
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("random-weight model:", dst)
EOF
[[ -f "$MODEL/config.json" ]] || { echo "no model to check with; stopping" | tee -a "$LOG"; exit 1; }

if [[ "$SMOKE" == 1 ]]; then
  L16=512; L8=256; STEPS=1; SPEED_STEPS=2; PACK_STEPS=2; SPEED_MODES=lorasft
else
  L16=16384; L8=8192; STEPS=2; SPEED_STEPS=8; PACK_STEPS=20; SPEED_MODES=naive,lorasft,packed
fi
export LORASFT_BENCH_MODEL=$MODEL

step environment 30 "$PY" -c '
import importlib.util, torch, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("flash_attn installed:", importlib.util.find_spec("flash_attn") is not None)'

step train_speed 120 "$PY" bench/speed/train_speed.py --steps "$SPEED_STEPS" --modes "$SPEED_MODES"

if "$PY" -c 'import flash_attn' 2>/dev/null; then
  step flash_packing 90 "$PY" -m lorasft train "model.path=$MODEL" model.attn_implementation=flash_attention_2 \
    data.packing=true "train.max_steps=$PACK_STEPS" train.eval_strategy=no train.early_stopping_patience=null \
    train.load_best_model_at_end=false eval.num_samples=4 "output.run_dir=$OUT/run-flash"
  step flash_s2 60 "$PY" -m lorasft train "model.path=$MODEL" model.attn_implementation=flash_attention_2 \
    data.packing=true data.max_length=2048 context.s2_attn=true context.s2_group=256 \
    "train.max_steps=$PACK_STEPS" train.eval_strategy=no train.early_stopping_patience=null \
    train.load_best_model_at_end=false eval.num_samples=0 "output.run_dir=$OUT/run-flash-s2"
else
  echo "== flash_packing: not run (flash-attn is not installed in this image)" | tee -a "$LOG"
  echo '{"step": "flash_packing", "exit": null, "note": "flash-attn not installed"}' >> "$JSON"
fi

step long_step 150 "$PY" bench/long_context/long_step.py --lengths "$L8" "$L16" --attention full s2 --steps "$STEPS" \
  --set "model.path=$MODEL" "context.target_length=$L16" --out "$OUT/long_step.json"

step long_corpus 30 "$PY" bench/long_context/long_corpus.py "$OUT/corpus"
cat > "$OUT/long.yaml" <<EOF
model: {path: $MODEL}
context: {target_length: $L16, method: yarn, trainable: [embed, norm], s2_attn: true}
lora: {target_modules: all-linear, dropout: 0.0}
train: {eval_strategy: "no", early_stopping_patience: null, load_best_model_at_end: false}
eval: {num_samples: 0, compare_base: false, long_data: [$OUT/corpus/eval.jsonl], long_lengths: [$L8, $L16], passkey_trials: 1}
output: {run_dir: $OUT/run-long}
stages:
  - {name: long, data: {train_file: $OUT/corpus/train.jsonl, format: text, max_length: $L16, val_ratio: 0}, train: {max_steps: $STEPS}}
EOF
step s2_train_and_long_eval 150 "$PY" -m lorasft train "$OUT/long.yaml"

# 6. vLLM behind `lorasft serve --engine vllm` (the run's adapter as a LoRA module, no merge):
#    answers checked with `lorasft verify --url`, then the serve_load clients against it
if "$PY" -c 'import vllm' 2>/dev/null; then
  step vllm_run 60 "$PY" -m lorasft train "model.path=$MODEL" train.max_steps=4 train.eval_strategy=no \
    train.early_stopping_patience=null train.load_best_model_at_end=false eval.num_samples=0 \
    eval.compare_base=false "output.run_dir=$OUT/run-vllm"
  vllm_serve() {
    "$PY" -m lorasft serve --engine vllm --adapter "r=$OUT/run-vllm" --port 8011 &
    local pid=$!
    for _ in $(seq 600); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
    "$PY" -m lorasft verify "$OUT/run-vllm" --url http://127.0.0.1:8011 --server-model r --num-prompts 8
    local rc=$?
    kill -TERM "$pid"; wait "$pid"
    return $rc
  }
  export -f vllm_serve
  export PY OUT
  step vllm_verify 420 bash -c vllm_serve
  step vllm_load 240 "$PY" bench/serving/serve_load.py --run "$OUT/run-vllm" --servers vllm transformers --seconds 5
else
  echo "== vllm: not run (vLLM is not installed in this image)" | tee -a "$LOG"
  echo '{"step": "vllm", "exit": null, "note": "vllm not installed"}' >> "$JSON"
fi

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [[ "$NGPU" -gt 1 ]]; then
  step fsdp 60 torchrun --nproc-per-node "$NGPU" -m lorasft train examples/fsdp.yaml "model.path=$MODEL" \
    train.max_steps=10 "output.run_dir=$OUT/run-fsdp"
else
  echo "== fsdp: not run ($NGPU GPU)" | tee -a "$LOG"
fi
echo "figures: $LOG, $JSON"
