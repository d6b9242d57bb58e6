#!/usr/bin/env bash
# The prepared device check (issue 12): one script, at most ~8 minutes on one H200, everything
# written under $OUT (default: ./device_check_out).
#
#   bench/device_check.sh             on the GPU
#   bench/device_check.sh --dry-run   the same steps on the CPU at tiny shapes (tests/integration/test_device_check.py)
#
# Steps (their logs appended to $OUT/logs.txt; a failed step is recorded and the next one still runs):
#   1. kernel_tests  the Triton grouped-logsumexp kernel against the reference and fp64 truth, fp32
#                    and bf16, with the tests' tolerance rule (pytest on tests/unit/test_triton_grouped_lse.py)
#   2. kernel_bench  bench/kernel.py at d=512: forward+backward TFLOP/s of the Triton kernel, masked
#                    dense CE and F.linear_cross_entropy, beside the measured bf16 matmul rate; 12
#                    and 1,000 super-classes (and 1: the dense case linear_cross_entropy covers),
#                    n_local up to 4M
#   3. train         a 1-GPU bf16 run of the synthetic recipe with evaluation and pictures, under
#                    FGDIST_SYNC_DEBUG=warn (host syncs per training step counted)
#   4. backbones     bench/step_time.py on 1 GPU, bf16, 32x32 synthetic images (issue 20): step time
#                    and peak memory of the narrow ResNet-18, a ResNet-50 (also with channels-last
#                    inputs: does bf16 gain from that memory format?) and timm's ViT-Tiny (patch 4)
#   5. summary       $OUT/device_check.json and $OUT/device_check.md (bench/device_check_summary.py)
# $OUT ends with seven files (the device machine returns at most eight): those two, kernel.json,
# kernel.md, train_results.json, backbones.md and logs.txt.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/device_check_out}"
WORK="$OUT/work"
rm -rf "$WORK" && mkdir -p "$WORK/logs"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
VIT="model.arch=timm:vit_tiny_patch16_224,model.width=null,model.stem=null,model.kwargs.img_size=32,model.kwargs.patch_size=4"
STATUS="$WORK/steps.tsv"
: >"$STATUS"
: >"$OUT/logs.txt"

step() { # step NAME COMMAND...: run it, log it, record its exit status and seconds
  local name=$1 start rc
  shift
  start=$(date +%s)
  echo "== $name: $*" >&2
  "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STATUS"
  { echo "== $name (rc $rc): $*"; cat "$WORK/logs/$name.log"; } >>"$OUT/logs.txt"
  [ $rc -eq 0 ] || { echo "   $name failed (rc $rc), last lines:" >&2; tail -5 "$WORK/logs/$name.log" >&2; }
}

if [ $DRY -eq 1 ]; then
  # The kernel in Triton's interpreter on one test of each dtype; tiny benchmark and training.
  step kernel_tests env TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider \
    tests/unit/test_triton_grouped_lse.py -k "dense_mode_equals_full_cross_entropy" --junitxml "$WORK/kernel_tests.xml"
  step kernel_bench python bench/kernel.py --device cpu --rows 64 --d 32 --n-local 2000 --groups 1 12 \
    --impls torch_reference masked_dense torch_linear_ce --repeats 1 --case-budget 0.2 \
    --out "$OUT/kernel.json" --md "$OUT/kernel.md"
  SHARDS=(--opt num_super=4 --opt fine_per_super=2 --opt train_per_fine=4 --opt test_per_fine=2)
  TRAIN=(--set optim.epochs=1 --set model.width=8 --set data.batch_size=8 --set eval.batch_size=16
    --set tracking.log_every_steps=1 --set tracking.system_metrics=false --set data.num_workers=1)
  # the two code paths (channels-last inputs, a timm model) at the smallest cost: two launches
  BACKBONES=(--steps 1 --warmup 0 --set data.batch_size=4 --channels-last resnet18_w8_cl
    --variant resnet18_w8_cl:model.width=8 --variant "vit_tiny:$VIT")
else
  step kernel_tests python -m pytest -q -p no:cacheprovider tests/unit/test_triton_grouped_lse.py \
    --junitxml "$WORK/kernel_tests.xml"
  step kernel_bench python bench/kernel.py --device cuda --d 512 --rows 4096 --n-local 125000 1250000 4000000 \
    --groups 1 12 1000 --impls triton masked_dense torch_linear_ce --repeats 3 --case-budget 2 \
    --out "$OUT/kernel.json" --md "$OUT/kernel.md"
  SHARDS=()
  TRAIN=(--set optim.epochs=3 --set data.num_workers=4 --set tracking.system_metrics=false)
  BACKBONES=(--steps 20 --warmup 5 --set data.batch_size=256 --channels-last resnet50_cl
    --variant resnet18_w16:model.width=16 --variant resnet50:model.arch=resnet50,model.width=null
    --variant resnet50_cl:model.arch=resnet50,model.width=null --variant "vit_tiny:$VIT")
fi

step shards python -m shards build --source synthetic --out "$WORK/shards" --quiet "${SHARDS[@]}"
# A plain process (no launcher): one rank; bf16 on CUDA (the config's default), fp32 on the CPU.
step train env FGDIST_SYNC_DEBUG=warn MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" \
  python launcher/train.py --config configs/synthetic_cpu.json --set "data.shards=$WORK/shards" \
  --set "output_dir=$WORK/runs" --set name=device_check "${TRAIN[@]}"
cp "$WORK/runs/device_check/results.json" "$OUT/train_results.json" 2>/dev/null
# 1 rank (deepspeed launcher, so 1 GPU on the device machine), no loader timing: the model's step alone
step backbones env MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" python bench/step_time.py \
  --config configs/synthetic_cpu.json --ranks 1 --no-loader --set "data.shards=$WORK/shards" \
  --set "output_dir=$WORK/runs" --machine "device check: $([ $DRY -eq 1 ] && echo 'CPU dry run' || echo '1 GPU, bf16')" \
  --out "$OUT/backbones.md" "${BACKBONES[@]}"
step summary python bench/device_check_summary.py --out "$OUT" --work "$WORK" --dry-run $DRY
cat "$OUT/device_check.md" 2>/dev/null
failed=$(grep -cv $'\t0\t' "$STATUS")
rm -rf "$WORK"  # what comes back from the device machine: the six files, not the work folder
[ "$failed" -eq 0 ]  # the script fails when any step failed
