#!/usr/bin/env bash
# The end-to-end demo on one machine: install, run the demo models, compare FP32 and INT8.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
EA=.venv/bin/edge-agent
M=agent/demo/models
WORK=${DEMO_DIR:-$(mktemp -d /tmp/edge-agent-demo.XXXXXX)}
echo "== demo working directory: $WORK"

echo "== 1. inference on the demo digits model, every runtime"
cp $M/reference/tflite_inputs.npy "$WORK/x.npy"
for model in digits_fp32.onnx digits_int8.onnx digits_fp32.tflite digits_int8.tflite; do
  $EA -q infer --model "$M/$model" --input "$WORK/x.npy" --output "$WORK/y_$model.npy"
done

echo "== 2. is INT8 faster than FP32 on THIS device? (CNN benchmark model)"
$EA -q bench-model --model $M/cnn_fp32.onnx --model $M/cnn_int8.onnx --seconds 3
