#!/usr/bin/env bash
# Builds and installs the arm64 .deb in an emulated Debian 12 arm64 root (qemu-user) and runs the demo story there.
set -uo pipefail

usage() {
    cat <<'USAGE'
Usage: packaging/deb/test_arm64.sh [options]

Makes (or unpacks from the cache) a Debian 12 arm64 root, the userland of Raspberry Pi OS
12, and runs it under qemu-user-static through binfmt_misc. This machine's pip downloads
the aarch64 wheels of onnxruntime, numpy, ai-edge-litert and the rest for the root's
Python and glibc (native pip is fast; pip under emulation took minutes and hit connection
resets); inside the root packaging/deb/build.sh builds the arm64 .deb from that wheelhouse
(venv, pip install --no-index, compileall, dpkg-deb), apt installs it, and the script runs
`edge-agent doctor`, `edge-agent infer` with the four demo digits models (ONNX Runtime and
LiteRT) on the golden inputs, `edge-agent gate` (INT8 vs FP32 ONNX on golden_local), and
the OTA story with the daemon: on digits 1.0.0 it takes a signed INT8 1.1.0 through its
control socket (gated and committed in the same process), refuses a tampered copy, and
rolls back to 1.0.0 on request. Outputs are compared with this machine's (x86-64) run of
the same models. Wall times are printed; latencies only as ratios inside the emulated run.
Every command in the root runs under the --time-limit deadline (timeout(1)). Prints one
line per check; exit 0 when all pass, 1 when one fails, 2 for bad usage, 77 when this
machine cannot run arm64 binaries (no root, no qemu-user-static/binfmt_misc).
Run it with `nice -n 10` on a shared machine: emulation is CPU-bound.

Options:
  --cache DIR    keeps the debootstrap tree as a tarball (default: /var/cache/edge-agent-test,
                 env EDGE_AGENT_TEST_CACHE)
  --mirror URL   Debian mirror (default: http://deb.debian.org/debian)
  --deb FILE     install this arm64 .deb (made by an earlier run, e.g. with --keep-deb)
                 instead of building one in the root
  --keep-deb DIR copy the arm64 .deb built in the root to DIR
  --time-limit S stop every step in the root after S seconds in all (default 1800;
                 a cold-cache debootstrap, about 80 min once, is not counted)
  --keep         keep the root afterwards (its path is printed)
  -h, --help     this text

Example:
  sudo nice -n 10 packaging/deb/test_arm64.sh
USAGE
}

die() { printf 'Error: %s\n' "$*" >&2; exit 2; }
skip_all() { printf 'skip  the whole arm64 test: %s\n' "$*"; exit 77; }

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${EDGE_AGENT_TEST_CACHE:-/var/cache/edge-agent-test}
MIRROR=http://deb.debian.org/debian
KEEP=0
SUITE=bookworm
DEB_IN=""
KEEP_DEB=""
LIMIT_S=1800
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=${2:?--cache needs a folder}; shift 2 ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --deb) DEB_IN=${2:?--deb needs a file}; shift 2 ;;
        --keep-deb) KEEP_DEB=${2:?--keep-deb needs a folder}; shift 2 ;;
        --time-limit) LIMIT_S=${2:?--time-limit needs seconds}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1 (packaging/deb/test_arm64.sh)" ;;
    esac
done
case "$LIMIT_S" in ''|*[!0-9]*) die "--time-limit $LIMIT_S: expected whole seconds (packaging/deb/test_arm64.sh)" ;; esac
[ -z "$DEB_IN" ] || [ -f "$DEB_IN" ] || die "$DEB_IN: .deb not found (--deb)"
[ -z "$DEB_IN" ] || DEB_IN=$(cd "$(dirname "$DEB_IN")" && pwd)/$(basename "$DEB_IN")
DEV_PY=${EDGE_AGENT_DEV_PYTHON:-$REPO/.venv/bin/python}
[ -x "$DEV_PY" ] || die "$DEV_PY: no dev venv (bash tools/setup.sh, or set EDGE_AGENT_DEV_PYTHON)"
[ "$(id -u)" = 0 ] || skip_all "needs root (debootstrap, chroot, mount)"
[ -x /usr/bin/qemu-aarch64-static ] || skip_all "no /usr/bin/qemu-aarch64-static (apt install qemu-user-static binfmt-support)"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
        || skip_all "cannot mount binfmt_misc (no mount rights)"
fi
if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
        || skip_all "cannot enable the qemu-aarch64 binfmt handler (update-binfmts --enable qemu-aarch64)"
fi
ARM_TAR=$CACHE/$SUITE-arm64-minbase.tar
[ -f "$ARM_TAR" ] || command -v debootstrap >/dev/null || skip_all "debootstrap not found (apt install debootstrap)"

T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
# seconds left before --time-limit (at least 1, so timeout(1) still runs and fails fast);
# the clock restarts after a cold-cache debootstrap, a one-time step of its own
LIMIT_T0=$T0
left() { _l=$((LIMIT_T0 + LIMIT_S - $(date +%s))); [ "$_l" -gt 0 ] && echo "$_l" || echo 1; }
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-agent-arm64.XXXXXX")
ROOT=$WORK/root
DAEMON_PID=""
PASSED=0
FAILED=0
TIMES=""

cleanup() {
    rc=$?
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    if [ -d "$ROOT" ]; then
        grep -F " $ROOT" /proc/self/mounts | cut -d' ' -f2 | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m"
        done
    fi
    if [ "$KEEP" = 1 ]; then
        printf 'root kept: %s\n' "$ROOT" >&2
    elif ! grep -qF " $ROOT" /proc/self/mounts; then
        rm -rf "$WORK"
    else
        printf 'note: mounts left under %s, not deleted\n' "$ROOT" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

log() { printf '[%4ss] %s\n' "$(elapsed)" "$*" >&2; }
check() {
    _what=$1
    shift
    if _out=$("$@" 2>&1); then
        PASSED=$((PASSED + 1))
        printf 'ok    %s\n' "$_what"
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL  %s\n' "$_what"
        printf '%s\n' "$_out" | tail -n 15 | sed 's/^/      /'
    fi
}
# timed NAME CMD...: run CMD, remember its wall time for the summary
timed() {
    _name=$1
    shift
    _t=$(date +%s)
    "$@"
    _rc=$?
    TIMES="$TIMES$_name $(($(date +%s) - _t)) s; "
    return $_rc
}
# every command in the root ends by the deadline: emulation can make a stuck step look
# like a slow one, and the run must stay bounded
in_root() {
    timeout -k 10 "$(left)" chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_CERT=/etc/ssl/host-ca.pem SSL_CERT_FILE=/etc/ssl/host-ca.pem PIP_RETRIES=10 "$@"
}

# ------------------------------------------------------------------ host side: fixtures, x86 reference
FIX=$WORK/fixtures
if [ -n "${EDGE_AGENT_TEST_FIXTURES:-}" ]; then
    # made earlier by make_test_fixtures.sh (saves a minute when rerunning by hand)
    mkdir -p "$FIX" && cp -r "$EDGE_AGENT_TEST_FIXTURES"/. "$FIX"/
else
    sh "$HERE/make_test_fixtures.sh" "$DEV_PY" "$FIX" >"$WORK/fixtures.log" 2>&1 \
        || { tail -n 20 "$WORK/fixtures.log" >&2; die "cannot make the test fixtures"; }
fi
MODELS="digits_fp32.onnx digits_int8.onnx digits_fp32.tflite digits_int8.tflite"
mkdir -p "$WORK/x86"
for m in $MODELS; do
    "$(dirname "$DEV_PY")/edge-agent" -q infer --model "$REPO/agent/demo/models/$m" \
        --input "$REPO/golden_local/inputs.npy" --output "$WORK/x86/$m.npy" >/dev/null 2>"$WORK/x86.err" \
        || { cat "$WORK/x86.err" >&2; die "x86 reference infer failed for $m"; }
done
"$(dirname "$DEV_PY")/edge-agent" -q gate --baseline "$REPO/agent/demo/models/digits_fp32.onnx" \
    --candidate "$REPO/agent/demo/models/digits_int8.onnx" --golden "$REPO/golden_local" \
    --report "$WORK/x86/gate.json" >/dev/null 2>&1
log "fixtures and the x86 reference outputs ready"

# ------------------------------------------------------------------ the arm64 root
mkdir -p "$CACHE"
if [ -f "$ARM_TAR" ]; then
    log "unpacking the cached arm64 root ($ARM_TAR)"
    mkdir -p "$ROOT" && tar -xpf "$ARM_TAR" -C "$ROOT" || die "cannot unpack $ARM_TAR"
else
    log "debootstrap --arch=arm64 $SUITE (cold cache; second stage under emulation)"
    timed debootstrap debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,adduser,ca-certificates \
        "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
    tar -cpf "$ARM_TAR.part" -C "$ROOT" . && mv "$ARM_TAR.part" "$ARM_TAR" \
        || log "warning: could not write the cache $ARM_TAR"
    LIMIT_T0=$(date +%s)
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# pip, should anything inside reach PyPI (the wheelhouse build does not), goes out the way
# this machine does: through the same CA bundle (a TLS-inspecting proxy's CA is in it)
cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ROOT/etc/ssl/host-ca.pem" \
    || die "cannot copy this machine's CA bundle into the root"
# /proc only: with the x86 host's /sys visible, onnxruntime's cpuinfo crashes the
# emulated process on import
mount -t proc proc "$ROOT/proc" || die "cannot mount /proc in the root"
check "the root runs aarch64 binaries (uname -m: $(in_root uname -m))" test "$(in_root uname -m)" = aarch64
PYV=$(in_root python3 -c 'import platform; print(platform.python_version())')
check "its python3 is $PYV (Debian 12 / Raspberry Pi OS 12: 3.11)" sh -c "case '$PYV' in 3.11.*) ;; *) exit 1 ;; esac"

# ------------------------------------------------------------------ build and install the .deb there
mkdir -p "$ROOT/root/src" "$ROOT/root/ea" "$ROOT/root/out" "$ROOT/root/wheels"
(cd "$REPO" && tar cf - pyproject.toml README.md CHANGELOG.md agent packaging systemd docs golden_local) \
    | tar xf - -C "$ROOT/root/src"
find "$ROOT/root/src" -name __pycache__ -type d -prune -exec rm -rf {} +
cp -r "$FIX"/. "$ROOT/root/ea/"
if [ -n "$DEB_IN" ]; then
    mkdir -p "$ROOT/root/dist" && cp "$DEB_IN" "$ROOT/root/dist/"
    DEB=/root/dist/$(basename "$DEB_IN")
    log "installing the given $DEB_IN (no build)"
else
    # The wheels for the root's Python and glibc, fetched by this machine's pip: the same
    # files pip inside would pick (manylinux tags up to the root's glibc, cp3X), in
    # seconds instead of minutes of emulated pip; kept in the cache for the next run.
    PYTAG=$(printf '%s' "$PYV" | cut -d. -f1,2)
    GLIBC=$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${Version}' libc6 2>/dev/null | cut -d- -f1)
    case "$GLIBC" in 2.[0-9]*) ;; *) die "cannot read the root's glibc version (libc6: '$GLIBC')" ;; esac
    WHEELS=$CACHE/wheels-$SUITE-arm64-cp$(printf '%s' "$PYTAG" | tr -d .)
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/edge_agent-*.whl
    WHEEL=$(EA_LIB_DIR=$REPO/packaging/lib && . "$REPO/packaging/lib/common.sh" && ea_build_wheel "$REPO" "$WHEELS" "$DEV_PY" 2>"$WORK/wheel.log") \
        || { cat "$WORK/wheel.log" >&2; die "cannot build the edge-agent wheel"; }
    set --
    for minor in $(seq "$(printf '%s' "$GLIBC" | cut -d. -f2)" -1 17); do
        set -- "$@" --platform "manylinux_2_${minor}_aarch64"
    done
    log "pip download: aarch64 wheels for Python $PYTAG, glibc $GLIBC (into $WHEELS)"
    timed pip_download "$DEV_PY" -m pip download --quiet --only-binary=:all: "$@" \
        --platform manylinux2014_aarch64 --platform linux_aarch64 --implementation cp \
        --python-version "$PYTAG" --dest "$WHEELS" "$WHEEL[litert]" >"$WORK/download.log" 2>&1 \
        || { grep -v 'is ignored' "$WORK/download.log" | tail -n 20 >&2; die "pip download of the aarch64 wheels failed (log above)"; }
    cp "$WHEELS"/*.whl "$ROOT/root/wheels/"
    check "aarch64 wheels for the root: $(cd "$WHEELS" && ls onnxruntime-*.whl numpy-*.whl ai_edge_litert-*.whl 2>/dev/null | cut -d- -f1,2 | tr '\n' ' ')" \
        sh -c "ls '$WHEELS'/onnxruntime-*aarch64.whl '$WHEELS'/numpy-*aarch64.whl '$WHEELS'/ai_edge_litert-*aarch64.whl"
    log "building the arm64 .deb inside the root (venv, pip --no-index from the wheelhouse, compileall, dpkg-deb)"
    # DEB_COMPRESSION=none: gzip of the 246 MB venv under emulation took 5 of the build's
    # 12 minutes in a run here
    timed build_deb in_root sh -c "cd /root/src && DEB_COMPRESSION=none sh packaging/deb/build.sh --out /root/dist \
        --wheel /root/wheels/$(basename "$WHEEL") --wheelhouse /root/wheels" >"$WORK/build.log" 2>&1
    DEB=$(tail -n 1 "$WORK/build.log")
    check "packaging/deb/build.sh inside the arm64 root made $(basename "$DEB")" \
        sh -c "case '$DEB' in /root/dist/edge-agent_*_arm64.deb) test -f '$ROOT$DEB' ;; *) tail -n 15 '$WORK/build.log'; exit 1 ;; esac"
    if [ -n "$KEEP_DEB" ] && [ -f "$ROOT$DEB" ]; then
        mkdir -p "$KEEP_DEB" && cp "$ROOT$DEB" "$KEEP_DEB/" && log "arm64 .deb kept: $KEEP_DEB/$(basename "$DEB")"
    fi
fi
check "its Architecture is arm64 (the venv holds aarch64 wheels)" \
    test "$(dpkg-deb -f "$ROOT$DEB" Architecture 2>/dev/null)" = arm64
SO=$(dpkg-deb -c "$ROOT$DEB" 2>/dev/null | grep -o 'opt/edge-agent/venv/lib/python3[^ ]*onnxruntime/capi/onnxruntime_pybind11_state[^ ]*\.so' | head -n 1)
check "the .deb carries onnxruntime's aarch64 extension ($(basename "$SO"))" sh -c "printf '%s' '$SO' | grep -q aarch64"
in_root apt-get update -qq >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get update failed in the root"; }
timed apt_install in_root apt-get install -y -q --no-install-recommends "$DEB" >"$WORK/install.log" 2>&1
check "apt-get install ./$(basename "$DEB")" sh -c "[ $? = 0 ] || { tail -n 15 '$WORK/install.log'; exit 1; }"
SITE=$(in_root sh -c 'ls -d /opt/edge-agent/venv/lib/python3*/site-packages' | head -n 1)
VERS=$(in_root /opt/edge-agent/venv/bin/python -c 'import numpy, onnxruntime, ai_edge_litert; from importlib.metadata import version; print("numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__, "ai-edge-litert", version("ai-edge-litert"))' 2>"$WORK/versions.err")
# without /sys (see the /proc mount above) onnxruntime's cpuinfo prints "Error in cpuinfo"
# warnings on every import and falls back to generic kernels; the run counts them
CPUINFO_WARN=$(grep -c 'cpuinfo' "$WORK/versions.err")
check "the venv imports numpy, onnxruntime and LiteRT on aarch64 ($VERS; $CPUINFO_WARN cpuinfo warning lines without /sys)" \
    sh -c "printf '%s' '$VERS' | grep -q '^numpy .* onnxruntime .* ai-edge-litert ' || { cat '$WORK/versions.err'; exit 1; }"
in_root runuser -u edge-agent -- edge-agent doctor --json >"$WORK/doctor.json" 2>/dev/null
doctor_row() {
    "$DEV_PY" -c 'import json, sys
rows = {c["name"]: c for c in json.load(open(sys.argv[1]))["checks"]}
print(rows[sys.argv[2]]["status"], rows[sys.argv[2]]["detail"])
sys.exit(0 if rows[sys.argv[2]]["status"] == "ok" else 1)' "$WORK/doctor.json" "$1"
}
for row in "backend onnx" "backend litert" numpy "service user"; do
    check "doctor as edge-agent: $row: $(doctor_row "$row" 2>&1 | head -n 1)" doctor_row "$row"
done

# ------------------------------------------------------------------ inference and the gate
for m in $MODELS; do
    timed "infer_$m" in_root edge-agent -q infer --model "$SITE/agent/demo/models/$m" \
        --input /root/src/golden_local/inputs.npy --output "/root/out/$m.npy" >"$WORK/infer.log" 2>&1
    check "edge-agent infer $m on the golden inputs (aarch64 wheels)" \
        sh -c "[ $? = 0 ] || { tail -n 15 '$WORK/infer.log'; exit 1; }"
done
COMPARE=$("$DEV_PY" - "$WORK/x86" "$ROOT/root/out" "$REPO/agent/demo/models" $MODELS 2>"$WORK/compare.err" <<'EOF'
import sys
from pathlib import Path
import numpy as np
x86, arm, models = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for m in sys.argv[4:]:
    a, b = np.load(x86 / f"{m}.npy"), np.load(arm / f"{m}.npy")
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    diff = np.abs(a - b)
    line = (f"{m} rows={len(a)} top1_agreement={agree:.4f} values_differing={int((diff > 0).sum())}"
            f"/{diff.size} max_abs_diff={float(diff.max()):.3g}")
    if m.endswith("int8.tflite"):
        # the int8 output's dequantization step: whole steps apart is integer rounding
        from ai_edge_litert.interpreter import Interpreter
        step = Interpreter(model_path=str(models / m)).get_output_details()[0]["quantization"][0]
        line += f" output_step={step:.4g} max_steps={float(diff.max()) / step:.2f}"
    print(line)
EOF
)
printf '%s\n' "$COMPARE" | sed 's/^/      arm64 vs x86-64: /'
N_INPUTS=$(printf '%s\n' "$COMPARE" | head -n 1 | sed -n 's/.*rows=\([0-9]*\).*/\1/p')
check "FP32 ONNX and both TFLite models agree with x86-64 on every top-1" \
    sh -c "printf '%s\n' \"\$1\" | grep -v '^digits_int8.onnx' | grep -vq 'top1_agreement=1.0000' && exit 1 || exit 0" _ "$COMPARE"
check "the INT8 TFLite model is within one int8 output step of x86-64 ($(printf '%s\n' "$COMPARE" | grep '^digits_int8.tflite' | grep -o 'values_differing=[^ ]*'))" \
    sh -c "printf '%s\n' \"\$1\" | grep '^digits_int8.tflite' | grep -Eq 'max_steps=(0|1)\.00$'" _ "$COMPARE"
# The gate twice: with golden_local's policy as shipped, for the record, and as the check
# with the same policy but latency_p95_ratio_max 20. Emulated time says nothing about a
# device's (qemu-user translates every instruction, on a build machine shared with
# others): INT8/FP32 p95 ratios from 1.05 to 2.9 were seen in runs here, 1.2 allowed. The
# checks of the numbers (accuracy, F1, ECE, agreement, per-class recall) stay as shipped;
# the daemon's OTA gate below uses the same emulation policy.
in_root edge-agent -q gate --baseline "$SITE/agent/demo/models/digits_fp32.onnx" \
    --candidate "$SITE/agent/demo/models/digits_int8.onnx" --golden /root/src/golden_local \
    --report /root/out/gate-shipped.json >"$WORK/gate-shipped.out" 2>&1
GATE_SHIPPED_RC=$?
GOLDEN_EMU=/root/ea/golden
sed -i 's/^latency_p95_ratio_max:.*/latency_p95_ratio_max: 20.0  # test_arm64.sh: emulated time is not judged/' \
    "$ROOT$GOLDEN_EMU/policy.yaml"
in_root edge-agent -q gate --baseline "$SITE/agent/demo/models/digits_fp32.onnx" \
    --candidate "$SITE/agent/demo/models/digits_int8.onnx" --golden "$GOLDEN_EMU" \
    --report /root/out/gate.json >"$WORK/gate.out" 2>&1
GATE_RC=$?
GATE=$("$DEV_PY" - "$WORK/x86/gate.json" "$ROOT/root/out/gate-shipped.json" "$ROOT/root/out/gate.json" <<'EOF'
import json, sys
for name, path in (("x86-64", sys.argv[1]), ("arm64, shipped policy", sys.argv[2]),
                   ("arm64, emulation policy", sys.argv[3])):
    try:
        rep = json.load(open(path))
    except (OSError, ValueError) as exc:
        print(f"{name}: no report ({exc})")
        continue
    m = rep["metrics"]
    lat = m["latency"]
    p50 = lat["candidate"]["p50_ms"] / lat["baseline"]["p50_ms"]
    p95 = lat["candidate"]["p95_ms"] / lat["baseline"]["p95_ms"]
    failed = rep.get("failed") or []
    print(f"{name}: verdict={rep['verdict']} int8_accuracy={m['candidate']['accuracy']:.4f} "
          f"fp32_accuracy={m['baseline']['accuracy']:.4f} "
          f"top1_agreement={m['agreement']['top1_agreement']:.4f} "
          f"int8/fp32_latency_ratio p50={p50:.2f} p95={p95:.2f}"
          + (f" failed={','.join(failed)}" if failed else ""))
EOF
)
printf '%s\n' "$GATE" | sed 's/^/      gate /'
check "edge-agent gate INT8 vs FP32 on golden_local passes on arm64 (numbers as shipped, latency not judged; exit $GATE_RC)" \
    sh -c "[ $GATE_RC = 0 ] || { grep -v cpuinfo '$WORK/gate.out' | tail -n 12; exit 1; }"

# ------------------------------------------------------------------ OTA hot swap with the daemon
STATE=/var/lib/edge-agent
cp -r "$ROOT$GOLDEN_EMU" "$ROOT$STATE/golden"
mkdir -p "$ROOT$STATE/incoming" && cp "$ROOT"/root/ea/dist/digits-1.*.tar "$ROOT$STATE/incoming/"
cat >"$ROOT/etc/edge-agent/agent.yaml" <<EOF
state_dir: $STATE
log_level: INFO
model: {path: $SITE/agent/demo/models/digits_fp32.onnx}
source: {kind: synthetic, pattern: digits}
scheduler: {fps_cap: 10}
sinks: [{kind: jsonl, path: $STATE/results.jsonl}]
status: {interval_s: 1.0}
# no sensors in a chroot, and the CPU guard would follow the build host's load
governor: {enabled: false}
ota: {enabled: true, repository_url: 'http://127.0.0.1:9', channel: stable, poll_interval_s: 3600, golden_dir: $STATE/golden, probation_frames: 20, probation_s: 1}
EOF
check "provision (keyring, TUF root)" \
    in_root edge-agent -q provision --config /etc/edge-agent/agent.yaml \
        --tuf-root /root/ea/repo/metadata/1.root.json --keyring /root/ea/keyring/ --device-id arm64-1
timed ota_install_offline in_root edge-agent -q install "$STATE/incoming/digits-1.0.0.tar" --config /etc/edge-agent/agent.yaml >"$WORK/install1.log" 2>&1
check "install digits 1.0.0 (FP32) from the file, no daemon: gate, probation, COMMITTED" \
    sh -c "[ $? = 0 ] || { tail -n 15 '$WORK/install1.log'; exit 1; }"
in_root chown -R edge-agent:edge-agent "$STATE"
status_field() {
    in_root edge-agent status --config /etc/edge-agent/agent.yaml --json 2>/dev/null \
        | "$DEV_PY" -c "import json,sys; s=json.load(sys.stdin); print($1)" 2>/dev/null
}
wait_for() {  # wait_for SECONDS CMD...
    _deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$_deadline" ] || return 1
        sleep 2
    done
}
# the daemon as the service user (no systemd here: a chroot), pid kept for the cleanup
chroot --userspec=edge-agent:edge-agent --groups=video "$ROOT" /usr/bin/env -i \
    PATH=/usr/bin:/bin HOME=/var/lib/edge-agent LANG=C.UTF-8 PYTHONUNBUFFERED=1 \
    /usr/bin/edge-agent run --config /etc/edge-agent/agent.yaml >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
on_version() { [ "$(status_field 's["state"]+" "+s["model"]["version"]')" = "running $1" ]; }
wait_for 300 on_version 1.0.0
check "the daemon runs the installed package digits 1.0.0" on_version 1.0.0
FRAMES_BEFORE=$(status_field 's["frames"]')
PID_BEFORE=$(status_field 's["pid"]')
# First an attack: a copy of 1.1.0 with one byte of its model flipped. The signature still
# covers the manifest, the model's digest no longer matches it (cryptography's and
# hashlib's aarch64 code decide); the genuine 1.1.0 must still go in after the refusal.
"$DEV_PY" - "$ROOT/root/ea/dist/digits-1.1.0.tar" "$ROOT$STATE/incoming/digits-1.1.0-tampered.tar" <<'EOF_PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1]) as src, tarfile.open(sys.argv[2], "w") as dst:
    members = [m for m in src.getmembers()]
    biggest = max((m for m in members if m.isfile()), key=lambda m: m.size)
    for m in members:
        data = src.extractfile(m).read() if m.isfile() else None
        if m is biggest:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        dst.addfile(m, io.BytesIO(data) if data is not None else None)
EOF_PY
in_root chown edge-agent:edge-agent "$STATE/incoming/digits-1.1.0-tampered.tar"
in_root edge-agent install "$STATE/incoming/digits-1.1.0-tampered.tar" --config /etc/edge-agent/agent.yaml >"$WORK/install3.log" 2>&1
TAMPER_RC=$?
check "a tampered 1.1.0 (one model byte flipped) is refused, exit $TAMPER_RC: $(grep '^Error' "$WORK/install3.log" | head -n 1)" \
    sh -c "[ $TAMPER_RC = 3 ] && grep -q '^Error: ' '$WORK/install3.log'"
check "... and the daemon still runs 1.0.0 in the same process (pid $(status_field 's["pid"]'))" \
    sh -c "[ \"\$1\" = 'running 1.0.0 $PID_BEFORE' ]" _ "$(status_field 's["state"]+" "+s["model"]["version"]+" "+str(s["pid"])')"
timed ota_install_daemon in_root edge-agent install "$STATE/incoming/digits-1.1.0.tar" --config /etc/edge-agent/agent.yaml >"$WORK/install2.log" 2>&1
INSTALL_RC=$?
check "edge-agent install digits-1.1.0 (INT8) through the daemon's control socket (exit $INSTALL_RC): $(tail -n 1 "$WORK/install2.log")" \
    sh -c "[ $INSTALL_RC = 0 ] || { tail -n 15 '$WORK/install2.log'; exit 1; }"
committed() { [ "$(status_field 's["model"]["version"]+" "+s["ota"]["state"]')" = "1.1.0 COMMITTED" ]; }
wait_for 300 committed
FRAMES_AFTER=$(status_field 's["frames"]')
check "hot swap: 1.1.0 COMMITTED in the same process (pid $PID_BEFORE -> $(status_field 's["pid"]'), frames $FRAMES_BEFORE -> $FRAMES_AFTER)" \
    sh -c "committed_state='$(status_field 's["model"]["version"]+" "+s["ota"]["state"]')'; [ \"\$committed_state\" = '1.1.0 COMMITTED' ] && [ '$(status_field 's["pid"]')' = '$PID_BEFORE' ] && [ '${FRAMES_AFTER:-0}' -gt '${FRAMES_BEFORE:-0}' ]"
LAST_GATE=$(status_field 's["ota"]["last_gate"]')
printf '      last gate on arm64: %s\n' "$LAST_GATE"
P50=$(status_field 's["latency_ms"]["p50"]')
timed ota_rollback in_root edge-agent rollback --config /etc/edge-agent/agent.yaml >"$WORK/rollback.log" 2>&1
ROLLBACK_RC=$?
rolled_back() { [ "$(status_field 's["model"]["version"]+" "+s["ota"]["state"]+" "+str(s["pid"])')" = "1.0.0 ROLLED_BACK $PID_BEFORE" ]; }
wait_for 120 rolled_back
check "edge-agent rollback through the daemon (exit $ROLLBACK_RC: $(tail -n 1 "$WORK/rollback.log")): back on 1.0.0, same pid" \
    sh -c "[ $ROLLBACK_RC = 0 ] && [ \"\$1\" = '1.0.0 ROLLED_BACK $PID_BEFORE' ]" _ "$(status_field 's["model"]["version"]+" "+s["ota"]["state"]+" "+str(s["pid"])')"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID"
DRC=$?
DAEMON_PID=""
check "SIGTERM: the daemon drains and exits 0 (exit $DRC)" test "$DRC" = 0
printf 'wall times (emulated, arm64 on x86-64 qemu-user): %stotal %s s\n' "$TIMES" "$(elapsed)"
printf 'daemon p50 model latency on INT8 1.1.0 in emulation: %s ms (not comparable with native)\n' "$P50"
check "the run stayed within --time-limit $LIMIT_S s ($(($(date +%s) - LIMIT_T0)) s, debootstrap not counted)" \
    test "$(($(date +%s) - LIMIT_T0))" -lt "$LIMIT_S"
printf 'arm64-test: %s passed, %s failed in %s s\n' "$PASSED" "$FAILED" "$(elapsed)"
[ "$FAILED" = 0 ]
