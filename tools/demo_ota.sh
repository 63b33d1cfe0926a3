#!/usr/bin/env bash
# The OTA story on one machine: a signed repository, the daemon on 1.0.0, INT8 1.1.0 hot-swapped
# after the gate passes, then a bad 1.2.0 refused by the gate while inference never stops.
#
#   bash tools/demo_ota.sh            # about 1-2 minutes; everything under a temp dir
#   DEMO_DIR=/tmp/x KEEP=1 bash tools/demo_ota.sh   # keep the files afterwards
#   DETECTOR=1 bash tools/demo_ota.sh # the same story with the shapes detector: FP32 1.0.0,
#                                     # INT8 1.1.0, 1.2.0 with the triangle class lowered
#
# Only 127.0.0.1 is used. Exit 0 when every step showed what it should.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT=$PWD
EA="$REPO_ROOT/.venv/bin/edge-agent"
PY="$REPO_ROOT/.venv/bin/python"
MODELS="$REPO_ROOT/agent/demo/models"
if [ -n "${DETECTOR:-}" ]; then
  NAME=shapes PATTERN=shapes GOLDEN="$REPO_ROOT/golden_local/detection"
  FP32="$MODELS/shapes_det_fp32.onnx" INT8="$MODELS/shapes_det_int8.onnx"
else
  # raw frames: each package's own preprocessing is gated too (docs/gate.md)
  NAME=digits PATTERN=digits GOLDEN="$REPO_ROOT/golden_local/raw"
  FP32="$MODELS/digits_fp32.onnx" INT8="$MODELS/digits_int8.onnx"
fi
WORK=${DEMO_DIR:-$(mktemp -d /tmp/edge-agent-ota.XXXXXX)}
mkdir -p "$WORK"
cd "$WORK"
SERVE_PID=""
DAEMON_PID=""

cleanup() {
  local rc=$?
  # only the processes this script started, by their pid
  for pid in $DAEMON_PID $SERVE_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [ "$rc" -ne 0 ]; then
    echo "== FAILED (exit $rc); daemon log tail:" >&2
    tail -n 30 "$WORK/daemon.log" >&2 2>/dev/null || true
  fi
  if [ -z "${KEEP:-}" ] && [ -z "${DEMO_DIR:-}" ]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }
ea() { echo "\$ edge-agent $*"; "$EA" -q "$@"; }
# status_field EXPR: one value out of `edge-agent status --json` (python expression on s)
status_field() {
  "$EA" status --config agent.yaml --json 2>/dev/null |
    "$PY" -c "import json,sys; s=json.load(sys.stdin); print($1)" 2>/dev/null || true
}
wait_until() {  # wait_until SECONDS DESCRIPTION EXPR VALUE
  local deadline=$((SECONDS + $1)) got=""
  while [ $SECONDS -lt $deadline ]; do
    got=$(status_field "$3")
    [ "$got" = "$4" ] && return 0
    sleep 0.5
  done
  echo "timed out after $1 s waiting for $2 (last: $got)" >&2
  return 1
}
# journaled VERSION: the OTA states the daemon journaled for VERSION (state.db, read-only),
# oldest first. A journaled state stays journaled, while the latest state, the model in
# status or the status file's "state" move on (the next poll, a probation verdict), so a
# wait on them can miss its moment on a busy machine.
journaled() {
  "$PY" - "$WORK/state/state.db" "$1" 2>/dev/null <<'PYEOF' || true
import sqlite3, sys
try:
    db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=10)
    rows = db.execute("SELECT state FROM ota_journal WHERE version = ? ORDER BY seq", (sys.argv[2],))
    print(" ".join(dict.fromkeys(r[0] for r in rows)))
except sqlite3.Error:
    print("")
PYEOF
}
wait_journaled() {  # wait_journaled SECONDS VERSION STATE [FAILING_STATE...]
  local deadline=$((SECONDS + $1)) version=$2 want=$3 got="" bad
  shift 3
  while [ $SECONDS -lt $deadline ]; do
    got=" $(journaled "$version") "
    case "$got" in *" $want "*) return 0 ;; esac
    for bad in "$@"; do
      case "$got" in
        *" $bad "*)
          echo "the daemon journaled $bad for $version, not $want (states:$got)" >&2
          return 1
          ;;
      esac
    done
    sleep 0.5
  done
  echo "timed out after $1 s waiting for $version to be journaled $want (states:$got)" >&2
  return 1
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "working directory: $WORK"

step "1. operator keys (offline root/targets/release, online rollout/snapshot/timestamp)"
for role in root targets snapshot timestamp rollout; do
  "$EA" -q keys generate --role $role --out keys/ >/dev/null
done
"$EA" -q keys generate --role release --name release-1 --out keys/ >/dev/null
ea keys keyring --out keyring/ --threshold 1 keys/release-1.pub.json

step "2. a TUF repository"
ea repo init repo --keys keys --release-threshold 1

step "3. $NAME 1.0.0 (FP32 ONNX): build and sign"
if [ "$NAME" = shapes ]; then
  cat >schema.yaml <<'EOF'
name: shapes
task: detection
runtime: {kind: onnx, precision: fp32}
preprocess: {resize: [64, 64], layout: NCHW, color_order: GRAY, mean: [0.0], std: [1.0], scale: 0.00392156862745098}
labels: [square, circle, triangle]
detection: {layout: yolo, box_units: normalized, score_threshold: 0.25, iou_threshold: 0.45, max_detections: 100}
compat: {min_agent_version: 0.1.0, hardware_classes: [], runtime_features: [onnx]}
EOF
else
  cat >schema.yaml <<'EOF'
name: digits
task: classification
runtime: {kind: onnx, precision: fp32}
preprocess: {resize: [8, 8], layout: NCHW, color_order: GRAY, mean: [0.0], std: [1.0], scale: 0.00392156862745098}
labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
compat: {min_agent_version: 0.1.0, hardware_classes: [], runtime_features: [onnx]}
EOF
fi
sed 's/precision: fp32/precision: int8/' schema.yaml >schema-int8.yaml
build() {  # build VERSION COUNTER MODEL SCHEMA
  ea package build --model "$3" --schema "$4" --out dist/ --version "$1" --release-counter "$2"
  ea package sign "dist/$NAME-$1.tar" --key keys/release-1.key
}
build 1.0.0 1 "$FP32" schema.yaml

step "4. provision the device and install 1.0.0 from the file (no daemon yet)"
PORT=$(free_port)
TOKEN_FILE=tokens.json
"$EA" -q token add --tokens $TOKEN_FILE --device demo-device-1 >token.txt
# Reading the fleet (rollout status --server, the fleet page) takes an operator token.
EDGE_AGENT_OPERATOR_TOKEN=$("$EA" -q token add --tokens $TOKEN_FILE --operator demo 2>/dev/null)
export EDGE_AGENT_OPERATOR_TOKEN
cat >agent.yaml <<EOF
state_dir: $WORK/state
log_level: INFO
source: {kind: synthetic, pattern: $PATTERN}
scheduler: {fps_cap: 20}
governor: {enabled: false}
sinks: [{kind: jsonl, path: $WORK/results.jsonl}]
telemetry:
  enabled: true
  endpoint: http://127.0.0.1:$PORT
  headers: {Authorization: "Bearer $(cat token.txt)"}
  upload_interval_s: 2
ota:
  enabled: true
  repository_url: http://127.0.0.1:$PORT
  channel: stable
  poll_interval_s: 2
  poll_jitter_s: 0
  golden_dir: $GOLDEN
  probation_frames: 40
  probation_s: 2
status: {interval_s: 0.5}
EOF
ea provision --config agent.yaml --tuf-root repo/metadata/1.root.json --keyring keyring/ \
  --device-id demo-device-1
ea install dist/$NAME-1.0.0.tar --config agent.yaml

step "5. the fleet server on 127.0.0.1:$PORT and the daemon"
"$EA" serve --repo repo --db fleet.db --tokens $TOKEN_FILE --port "$PORT" >serve.log 2>&1 &
SERVE_PID=$!
"$EA" run --config agent.yaml >daemon.log 2>&1 &
DAEMON_PID=$!
# frames counted on 1.0.0 are a fact; state "running" can read "stalled" for a moment on a
# busy machine
wait_until 180 "the daemon to infer on 1.0.0" \
  's["model"]["version"]+" "+str(s["frames"] > 0)' "1.0.0 True"
ea status --config agent.yaml

step "6. publish INT8 1.1.0 and roll it out to 100%"
build 1.1.0 2 "$INT8" schema-int8.yaml
ea publish dist/$NAME-1.1.0.tar --repo repo --keys keys
FRAMES_BEFORE=$(status_field 's["frames"]')
ea rollout start --channel stable --version 1.1.0 --package $NAME --repo repo --keys keys \
  --stages 100
wait_journaled 300 1.1.0 COMMITTED REJECTED ROLLED_BACK
wait_until 60 "the daemon to report 1.1.0" 's["model"]["version"]' "1.1.0"
ea status --config agent.yaml
FRAMES_AFTER=$(status_field 's["frames"]')
PID_NOW=$(status_field 's["pid"]')
echo "frames ${FRAMES_BEFORE} -> ${FRAMES_AFTER}, daemon pid $DAEMON_PID -> $PID_NOW (same process: hot swap)"
[ "$PID_NOW" = "$DAEMON_PID" ] && [ "$FRAMES_AFTER" -gt "$FRAMES_BEFORE" ]

if [ "$NAME" = shapes ]; then
step "7. a bad 1.2.0 (the triangle class's scores lowered): published, rolled out, refused by the gate"
cp "$MODELS/shapes_det_lowered.onnx" bad.onnx
else
step "7. a bad 1.2.0 (class 3's bias lowered): published, rolled out, refused by the gate"
"$PY" - "$REPO_ROOT/tools" "$MODELS/digits_mlp_weights.npz" bad.onnx <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from demo_models import MLPWeights, mlp_onnx
w = MLPWeights.load(Path(sys.argv[2]))
b2 = w.b2.copy()
b2[3] -= 4.0  # the model almost never answers "3" any more
mlp_onnx(MLPWeights(w.w1, w.b1, w.w2, b2), Path(sys.argv[3]))
EOF
fi
build 1.2.0 3 bad.onnx schema.yaml
ea publish dist/$NAME-1.2.0.tar --repo repo --keys keys
FRAMES_BEFORE=$(status_field 's["frames"]')
ea rollout start --channel stable --version 1.2.0 --package $NAME --repo repo --keys keys \
  --stages 100
wait_journaled 300 1.2.0 REJECTED COMMITTED PROBATION
wait_until 60 "the refusal of 1.2.0 in status" \
  '(s["ota"]["last_refusal"] or {}).get("version")' "1.2.0"
ea status --config agent.yaml
FRAMES_AFTER=$(status_field 's["frames"]')
VERSION=$(status_field 's["model"]["version"]')
REASON=$(status_field 's["ota"]["last_refusal_reason"]')
echo "frames ${FRAMES_BEFORE} -> ${FRAMES_AFTER}; still running $VERSION; refused: $REASON"
[ "$VERSION" = "1.1.0" ] && [ "$FRAMES_AFTER" -gt "$FRAMES_BEFORE" ]
case "$REASON" in "gate failed"*) ;; *) echo "unexpected refusal: $REASON" >&2; exit 1 ;; esac

step "8. the fleet's view (from the device's uploaded telemetry), then stop everything (SIGTERM)"
# telemetry is uploaded every 2 s: wait until the server has heard of the refusal
deadline=$((SECONDS + 30))
while [ $SECONDS -lt $deadline ]; do
  "$EA" -q rollout status --channel stable --server "http://127.0.0.1:$PORT" 2>/dev/null |
    grep -q "REJECTED" && break
  sleep 0.5
done
ea rollout status --channel stable --server "http://127.0.0.1:$PORT"
kill -TERM "$DAEMON_PID"
set +e
wait "$DAEMON_PID"
DAEMON_RC=$?
set -e
DAEMON_PID=""
echo "daemon exited with $DAEMON_RC"
[ "$DAEMON_RC" -eq 0 ]
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=""
echo
echo "demo OK"
