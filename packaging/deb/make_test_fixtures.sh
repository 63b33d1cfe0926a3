#!/bin/sh
# Makes what the device tests install: a hanging model, operator keys, a TUF root, two signed digits packages.
# Usage: packaging/deb/make_test_fixtures.sh DEV_PYTHON OUT_DIR
#   DEV_PYTHON: the repository's dev venv python (onnx, the agent); OUT_DIR is filled with
#   hang.onnx, keys/, keyring/, repo/ (repo/metadata/1.root.json), dist/digits-1.0.0.tar
#   (FP32) and dist/digits-1.1.0.tar (INT8), both signed, and golden/ (golden_local).
set -eu
[ $# = 2 ] || { echo "Error: usage: make_test_fixtures.sh DEV_PYTHON OUT_DIR (packaging/deb)" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=$1
EA=$(dirname "$PY")/edge-agent
mkdir -p "$2"
cd "$2"
"$PY" "$HERE/hang_model.py" hang.onnx
for role in root targets snapshot timestamp rollout; do
    "$EA" -q keys generate --role $role --out keys/ >/dev/null
done
"$EA" -q keys generate --role release --name release-1 --out keys/ >/dev/null
"$EA" -q keys keyring --out keyring/ --threshold 1 keys/release-1.pub.json >/dev/null
"$EA" -q repo init repo --keys keys --release-threshold 1 >/dev/null
cat >schema.yaml <<'YAML'
name: digits
task: classification
runtime: {kind: onnx, precision: fp32}
preprocess: {resize: [8, 8], layout: NCHW, color_order: GRAY, mean: [0.0], std: [1.0], scale: 0.00392156862745098}
labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
compat: {min_agent_version: 0.1.0, hardware_classes: [], runtime_features: [onnx]}
YAML
sed 's/precision: fp32/precision: int8/' schema.yaml >schema-int8.yaml
MODELS=$REPO/agent/demo/models
"$EA" -q package build --model "$MODELS/digits_fp32.onnx" --schema schema.yaml \
    --out dist/ --version 1.0.0 --release-counter 1 >/dev/null
"$EA" -q package build --model "$MODELS/digits_int8.onnx" --schema schema-int8.yaml \
    --out dist/ --version 1.1.0 --release-counter 2 >/dev/null
for v in 1.0.0 1.1.0; do
    "$EA" -q package sign "dist/digits-$v.tar" --key keys/release-1.key >/dev/null
done
rm -rf golden
cp -r "$REPO/golden_local" golden
echo "$2"
