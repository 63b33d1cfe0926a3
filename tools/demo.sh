#!/usr/bin/env bash
# The end-to-end demo on one machine: install, run the demo models, gate INT8 against FP32,
# then the whole OTA story (signed repository, daemon, hot swap, a bad release refused).
#
#   bash tools/demo.sh        # a few minutes on a fresh machine (most of it is pip)
#
# Everything runs on 127.0.0.1 and under temp dirs; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
EA=.venv/bin/edge-agent
M=agent/demo/models
WORK=$(mktemp -d /tmp/edge-agent-demo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo
echo "== 1. inference on the demo digits model with every runtime"
cp $M/reference/tflite_inputs.npy "$WORK/x.npy"
for model in digits_fp32.onnx digits_int8.onnx digits_fp32.tflite digits_int8.tflite; do

  $EA -q infer --model "$M/$model" --input "$WORK/x.npy" --output "$WORK/y_$model.npy"
done

echo
echo "== 2. is INT8 faster than FP32 on THIS device? (the CNN benchmark model)"
$EA -q bench-model --model $M/cnn_fp32.onnx --model $M/cnn_int8.onnx --seconds 3

echo
echo "== 3. the golden gate: INT8 digits model against the FP32 one on golden_local/"
$EA -q gate --baseline $M/digits_fp32.onnx --candidate $M/digits_int8.onnx \
  --golden golden_local --report "$WORK/gate.json"

echo
echo "== 4. the OTA story: repository, daemon, INT8 hot swap, a bad release refused"
bash tools/demo_ota.sh
