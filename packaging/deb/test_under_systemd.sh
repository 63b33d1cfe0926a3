#!/usr/bin/env bash
# Installs the edge-agent .deb with apt into a Debian 12 root booted by systemd-nspawn and checks the unit under a real systemd.
set -uo pipefail

usage() {
    cat <<'USAGE'
Usage: packaging/deb/test_under_systemd.sh [options]

Builds the .deb (or takes --deb), makes a fresh Debian 12 root with systemd, boots it with
systemd-nspawn (systemd is PID 1 there), installs the .deb with apt inside the running
system and checks what the unit promises under the real service manager: READY=1 before
active, STATUS=, journald, reload with a good and a bad config, the watchdog on a hung
frame loop, Restart= limits, StateDirectory/RuntimeDirectory, the hardening, an OTA
install through the running service, then apt remove and apt purge.
Prints one line per check ("ok", "FAIL" or "skip" with the reason); exit 0 when all pass,
1 when one fails, 2 for bad usage, 77 when this machine cannot run it (no root, no
systemd-nspawn, no mount rights). The machine is stopped and the mounts are gone at the end,
whatever happened.

Options:
  --deb FILE     test this .deb (built on Debian 12 amd64) instead of building one
  --cache DIR    keeps the debootstrap tree as a tarball (default: /var/cache/edge-agent-test,
                 env EDGE_AGENT_TEST_CACHE); delete it for a cold run
  --mirror URL   Debian mirror (default: http://deb.debian.org/debian)
  --keep         keep the root afterwards (its path is printed)
  --status-out FILE   write the container's `systemctl status edge-agent` there
  -h, --help     this text

Example:
  sudo packaging/deb/test_under_systemd.sh
USAGE
}

die() { printf 'Error: %s\n' "$*" >&2; exit 2; }
skip_all() { printf 'skip  the whole systemd test: %s\n' "$*"; exit 77; }

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DEB=""
CACHE=${EDGE_AGENT_TEST_CACHE:-/var/cache/edge-agent-test}
MIRROR=http://deb.debian.org/debian
KEEP=0
STATUS_OUT=""
SUITE=bookworm
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) DEB=${2:?--deb needs a file}; shift 2 ;;
        --cache) CACHE=${2:?--cache needs a folder}; shift 2 ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --status-out) STATUS_OUT=${2:?--status-out needs a file}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1 (packaging/deb/test_under_systemd.sh)" ;;
    esac
done
[ -z "$DEB" ] || [ -f "$DEB" ] || die "$DEB: .deb not found"
DEV_PY=${EDGE_AGENT_DEV_PYTHON:-$REPO/.venv/bin/python}
[ -x "$DEV_PY" ] || die "$DEV_PY: no dev venv (bash tools/setup.sh, or set EDGE_AGENT_DEV_PYTHON)"

[ "$(id -u)" = 0 ] || skip_all "needs root (debootstrap, mount, systemd-nspawn)"
command -v systemd-nspawn >/dev/null || skip_all "systemd-nspawn not found (apt install systemd-container)"
command -v nsenter >/dev/null || skip_all "nsenter not found (apt install util-linux)"
BASE_TAR=$CACHE/$SUITE-amd64-systemd.tar
if [ ! -f "$BASE_TAR" ]; then
    command -v debootstrap >/dev/null || skip_all "debootstrap not found (apt install debootstrap)"
fi

T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-agent-systemd.XXXXXX")
ROOT=$WORK/root
MACHINE=ea-test-$$
NSPAWN_PID=""
NSPAWN_RC=""
INIT=""
MOUNTED_NSPAWN_TMPFS=0
PASSED=0
FAILED=0
SKIPPED=0

stop_machine() {
    [ -n "$NSPAWN_PID" ] || return 0
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # nspawn turns SIGTERM into a clean shutdown of the container's systemd
        kill -TERM "$NSPAWN_PID" 2>/dev/null
        for _ in $(seq 120); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            printf 'machine did not stop in 60 s: SIGKILL to nspawn %s\n' "$NSPAWN_PID" >&2
            kill -KILL "$NSPAWN_PID" 2>/dev/null
        fi
    fi
    wait "$NSPAWN_PID" 2>/dev/null
    NSPAWN_RC=$?
    NSPAWN_PID=""
}

cleanup() {
    rc=$?
    stop_machine
    # whatever is still mounted under the root (the machine's own mounts live in its
    # namespace and went with it; this catches anything of ours)
    if [ -d "$ROOT" ]; then
        grep -F " $ROOT" /proc/self/mounts | cut -d' ' -f2 | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m"
        done
    fi
    if [ "$MOUNTED_NSPAWN_TMPFS" = 1 ]; then
        umount /run/systemd/nspawn 2>/dev/null || printf 'note: /run/systemd/nspawn still busy, left mounted\n' >&2
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
    # check "what" CMD...: one line per check, the command's output only when it fails
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
skip() { SKIPPED=$((SKIPPED + 1)); printf 'skip  %s\n' "$*"; }
equals() { [ "$1" = "$2" ] || { printf 'got "%s", want "%s"\n' "$1" "$2"; return 1; }; }

# ------------------------------------------------------------------ the .deb and fixtures
if [ -z "$DEB" ]; then
    log "building the .deb (packaging/deb/build.sh, all dependencies)"
    DEB=$(DEB_COMPRESSION=gzip BUILD_PYTHON=${BUILD_PYTHON:-$DEV_PY} sh "$REPO/packaging/deb/build.sh" \
        --out "$WORK/dist" 2>"$WORK/build.log" | tail -n 1) \
        || { tail -n 20 "$WORK/build.log" >&2; die "build.sh failed"; }
    [ -f "$DEB" ] || { tail -n 20 "$WORK/build.log" >&2; die "build.sh made no .deb"; }
fi
DEB_NAME=$(basename "$DEB")
VERSION=$(dpkg-deb -f "$DEB" Version)
log "package: $DEB_NAME"

# Everything the checks need, made on the host with the dev venv: a model that hangs on
# real frames, operator keys, a TUF root, two signed digits packages.
FIX=$WORK/fixtures
mkdir -p "$FIX"
if [ -n "${EDGE_AGENT_TEST_FIXTURES:-}" ]; then
    # made earlier by make_test_fixtures.sh (saves a minute when rerunning by hand)
    cp -r "$EDGE_AGENT_TEST_FIXTURES"/. "$FIX"/
else
    sh "$HERE/make_test_fixtures.sh" "$DEV_PY" "$FIX" >"$WORK/fixtures.log" 2>&1 || { tail -n 20 "$WORK/fixtures.log" >&2; die "cannot make the test fixtures"; }
fi

# ------------------------------------------------------------------ the root
mkdir -p "$CACHE"
if [ -f "$BASE_TAR" ]; then
    log "unpacking the cached Debian $SUITE root ($BASE_TAR)"
    mkdir -p "$ROOT" && tar -xpf "$BASE_TAR" -C "$ROOT" || die "cannot unpack $BASE_TAR"
else
    log "debootstrap $SUITE with systemd (cold cache: $BASE_TAR is made for the next run)"
    debootstrap --include=systemd,systemd-sysv,dbus,python3,adduser \
        "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # apt's package lists and downloads are not part of the pristine root
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
    tar -cpf "$BASE_TAR.part" -C "$ROOT" . && mv "$BASE_TAR.part" "$BASE_TAR" \
        || log "warning: could not write the cache $BASE_TAR"
fi
log "root ready"
mkdir -p "$ROOT/root/ea"
cp "$DEB" "$ROOT/root/ea/$DEB_NAME"
cp -r "$FIX"/. "$ROOT/root/ea/"
# a fresh machine-id per boot, as on a first boot of a flashed image
: >"$ROOT/etc/machine-id"
printf '%s\n' "$MACHINE" >"$ROOT/etc/hostname"

# ------------------------------------------------------------------ boot
# nspawn refuses to clean up a /run/systemd/nspawn that is not a tmpfs
mkdir -p /run/systemd/nspawn
if [ "$(stat -f -c %T /run/systemd/nspawn)" != tmpfs ]; then
    mount -t tmpfs tmpfs /run/systemd/nspawn 2>"$WORK/mount.err" \
        || skip_all "cannot mount a tmpfs on /run/systemd/nspawn ($(cat "$WORK/mount.err")): no mount rights"
    MOUNTED_NSPAWN_TMPFS=1
fi
log "booting $MACHINE with systemd-nspawn"
# --register=no --keep-unit: there may be no host systemd (or bus) to register with
systemd-nspawn --quiet --register=no --keep-unit --console=passive --resolv-conf=copy-host \
    -M "$MACHINE" -D "$ROOT" -b >"$WORK/boot.log" 2>&1 </dev/null &
NSPAWN_PID=$!

find_init() {
    # the container's systemd: nspawn's child, PID 1 in its own pid namespace
    for p in $(pgrep -P "$NSPAWN_PID"); do
        grep -q '^NSpid:.*[[:space:]]1$' "/proc/$p/status" 2>/dev/null || continue
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && { echo "$p"; return 0; }
    done
    return 1
}
for _ in $(seq 120); do
    INIT=$(find_init) && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.5
done
if [ -z "$INIT" ]; then
    tail -n 20 "$WORK/boot.log" >&2
    # a kernel or sandbox that forbids namespaces is a missing capability, not a failure
    grep -qi 'operation not permitted\|permission denied' "$WORK/boot.log" \
        && skip_all "systemd-nspawn cannot create the container here (see above)"
    die "the container's systemd did not start (log above)"
fi

# in_ct CMD...: run inside the machine (all its namespaces) with a clean environment
in_ct() {
    nsenter -t "$INIT" -a /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive SYSTEMD_COLORS=0 "$@"
}
sd_show() { in_ct systemctl show -p "$1" --value edge-agent; }
# systemctl answers once PID 1 has its private socket up; then wait for the boot to end
for _ in $(seq 120); do
    in_ct test -S /run/systemd/private && break
    sleep 0.5
done
BOOT_STATE=$(in_ct timeout 180 systemctl is-system-running --wait 2>&1)
log "booted: systemd $(in_ct systemctl --version | head -n 1 | cut -d' ' -f2), system $BOOT_STATE"
check "systemd is PID 1 in the machine and the system came up ($BOOT_STATE)" \
    sh -c "[ '$(in_ct cat /proc/1/comm)' = systemd ] && { [ '$BOOT_STATE' = running ] || [ '$BOOT_STATE' = degraded ]; }"
if [ "$BOOT_STATE" = degraded ]; then
    in_ct systemctl --failed --no-legend --plain | sed 's/^/      failed at boot (not ours): /'
fi

# ------------------------------------------------------------------ apt install, under systemd
in_ct apt-get update -qq >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get update failed in the machine"; }
log "apt-get install ./$DEB_NAME in the running machine"
check "apt-get install ./$DEB_NAME while systemd runs" \
    in_ct apt-get install -y -q --no-install-recommends "/root/ea/$DEB_NAME"
check "unit enabled by the package" equals "$(in_ct systemctl is-enabled edge-agent 2>&1)" enabled

# The shipped config names no model and nothing is provisioned: postinst starts the
# service, which stops with a clear error and, restarted on failure, hits the start limit.
wait_for() {  # wait_for SECONDS CMD...: until CMD succeeds
    _deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$_deadline" ] || return 1
        sleep 1
    done
}
unit_failed() { [ "$(sd_show ActiveState)" = failed ]; }
wait_for 120 unit_failed
check "fresh install, no model configured: the unit fails (result $(sd_show Result)), not active" unit_failed
check "... and the journal says why (model.path: no model configured)" \
    sh -c "nsenter -t $INIT -a journalctl -u edge-agent -o cat --no-pager | grep -q 'model.path: no model configured'"

# ------------------------------------------------------------------ a working config
SITE=$(in_ct sh -c 'ls -d /opt/edge-agent/venv/lib/python3*/site-packages' | head -n 1)
CONF=$ROOT/etc/edge-agent/agent.yaml
write_config() {  # write_config MODEL FPS [EXTRA_YAML]: the admin edits the conffile
    cat >"$CONF.new" <<EOF
state_dir: /var/lib/edge-agent
log_level: INFO
model:
  path: $1
  labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
preprocess: {resize: [8, 8], layout: NCHW, color_order: GRAY, scale: 0.00392156862745098}
source: {kind: synthetic, pattern: digits}
scheduler: {fps_cap: $2}
sinks: [{kind: jsonl, path: /var/lib/edge-agent/results.jsonl}]
status: {interval_s: 1.0}
# no sensors in the container, and the CPU guard would react to the build host's load
# (other jobs at 100 %) and move the cap under the reload checks
governor: {enabled: false}
${3:-}
EOF
    chown --reference="$CONF" "$CONF.new" && chmod 0640 "$CONF.new" && mv "$CONF.new" "$CONF"
}
DIGITS=$SITE/agent/demo/models/digits_fp32.onnx
write_config "$DIGITS" 10
restart_unit() {
    # manual starts count against StartLimitBurst too; each check starts from zero
    in_ct systemctl reset-failed edge-agent 2>/dev/null
    in_ct systemctl restart edge-agent
}
check "systemctl restart with a model configured" restart_unit
check "unit active" equals "$(in_ct systemctl is-active edge-agent)" active

# READY=1: systemd logs "Started" only when READY=1 arrives; the agent says "running"
# right after sending it. A copy of the unit whose notifications go nowhere must never
# become active (the negative control: Type=notify is what holds it in "activating").
journal_cat() { in_ct journalctl -u "${1:-edge-agent}" -o cat --no-pager; }
MAIN=$(sd_show MainPID)
check "STATUS= from the agent shown by systemd: \"$(sd_show StatusText)\"" \
    sh -c "printf '%s' \"\$1\" | grep -q 'fps'" _ "$(sd_show StatusText)"
check "journald has the agent's log lines (edge-agent $VERSION running: digits_fp32)" \
    sh -c "nsenter -t $INIT -a journalctl -u edge-agent _PID=$MAIN -o cat --no-pager | grep -q 'edge-agent $VERSION running: digits_fp32'"
check "journald: the agent's lines carry SYSLOG_IDENTIFIER=edge-agent" \
    sh -c "nsenter -t $INIT -a journalctl -u edge-agent _PID=$MAIN -o verbose --no-pager | grep -q 'SYSLOG_IDENTIFIER=edge-agent'"
NOREADY=$ROOT/etc/systemd/system/edge-agent-noready.service
sed -e 's#^ExecStart=.*#&\nEnvironment=NOTIFY_SOCKET=/run/edge-agent-nobody-listens#' \
    -e 's#^TimeoutStartSec=.*#TimeoutStartSec=25#' \
    -e 's#^Restart=.*#Restart=no#' \
    -e 's#^RuntimeDirectory=.*#RuntimeDirectory=edge-agent-noready#' \
    -e 's#^StateDirectory=.*#StateDirectory=edge-agent-noready#' \
    "$ROOT/lib/systemd/system/edge-agent.service" >"$NOREADY"
# its own state dir and status file, so it cannot disturb the real unit
sed -e 's#/var/lib/edge-agent#/var/lib/edge-agent-noready#g' "$CONF" >"$ROOT/etc/edge-agent/noready.yaml"
chown --reference="$CONF" "$ROOT/etc/edge-agent/noready.yaml"
chmod 0640 "$ROOT/etc/edge-agent/noready.yaml"
sed -i 's#--config /etc/edge-agent/agent.yaml#--config /etc/edge-agent/noready.yaml#' "$NOREADY"
in_ct systemctl daemon-reload
in_ct systemctl start --no-block edge-agent-noready
noready_running() { journal_cat edge-agent-noready | grep -q "edge-agent $VERSION running"; }
wait_for 60 noready_running
check "control: a copy whose READY=1 goes nowhere runs (its log says running) ..." noready_running
check "... but stays activating, never active ($(in_ct systemctl show -p ActiveState,SubState --value edge-agent-noready | tr '\n' ' '))" \
    equals "$(in_ct systemctl show -p ActiveState --value edge-agent-noready)" activating
noready_done() { [ "$(in_ct systemctl show -p ActiveState --value edge-agent-noready)" != activating ]; }
wait_for 60 noready_done
check "... and is killed when TimeoutStartSec= runs out (result $(in_ct systemctl show -p Result --value edge-agent-noready))" \
    equals "$(in_ct systemctl show -p Result --value edge-agent-noready)" timeout
rm -f "$NOREADY" "$ROOT/etc/edge-agent/noready.yaml"
in_ct systemctl daemon-reload
in_ct systemctl reset-failed edge-agent-noready 2>/dev/null
# the real unit: systemd's "Started" comes after the agent's "running" line (READY=1 first)
order_ok() {
    # the last start of the real unit: the agent's line, then systemd's
    _j=$(journal_cat)
    _ready=$(printf '%s\n' "$_j" | grep -n "edge-agent $VERSION running: digits_fp32" | tail -n 1 | cut -d: -f1)
    _started=$(printf '%s\n' "$_j" | grep -n "Started edge-agent.service" | tail -n 1 | cut -d: -f1)
    echo "agent line $_ready, Started line $_started"
    [ -n "$_ready" ] && [ -n "$_started" ] && [ "$_ready" -lt "$_started" ]
}
check "real unit: the agent's READY line comes before systemd's \"Started edge-agent.service\"" order_ok

# ------------------------------------------------------------------ directories, status
stat_of() { in_ct stat -c '%U:%G %a' "$1"; }
check "StateDirectory /var/lib/edge-agent edge-agent:edge-agent 0750" \
    equals "$(stat_of /var/lib/edge-agent)" "edge-agent:edge-agent 750"
check "RuntimeDirectory /run/edge-agent edge-agent:edge-agent 0750" \
    equals "$(stat_of /run/edge-agent)" "edge-agent:edge-agent 750"
check "LogsDirectory /var/log/edge-agent owned by edge-agent" \
    sh -c "[ \"\$(nsenter -t $INIT -a stat -c %U /var/log/edge-agent)\" = edge-agent ]"
check "status.json on tmpfs: state_dir/status.json -> /run/edge-agent/status.json" \
    equals "$(in_ct readlink /var/lib/edge-agent/status.json)" /run/edge-agent/status.json
check "control socket edge-agent:edge-agent 0660" \
    equals "$(stat_of /var/lib/edge-agent/control.sock)" "edge-agent:edge-agent 660"
check "files the agent makes are not world-readable (UMask=0027): results.jsonl" \
    sh -c "wait_s=0; until [ -f '$ROOT/var/lib/edge-agent/results.jsonl' ] || [ \$wait_s -gt 20 ]; do sleep 1; wait_s=\$((wait_s+1)); done; [ \"\$(stat -c %a '$ROOT/var/lib/edge-agent/results.jsonl')\" = 640 ]"
check "edge-agent status (as root) reads the running daemon: exit 0" \
    in_ct edge-agent status --config /etc/edge-agent/agent.yaml

# ------------------------------------------------------------------ hardening
SEC=$(in_ct systemd-analyze security --no-pager edge-agent.service 2>&1 | tail -n 1)
EXPOSURE=$(printf '%s' "$SEC" | sed -n 's/.*Overall exposure level for edge-agent.service: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p')
check "systemd-analyze security edge-agent: exposure $EXPOSURE (wanted SAFE or OK)" \
    sh -c "printf '%s' '$EXPOSURE' | grep -Eq ' (SAFE|OK)$'"
proc_field() { in_ct sh -c "sed -n 's/^$1:[[:space:]]*//p' /proc/$MAIN/status"; }
check "NoNewPrivileges: the running agent has NoNewPrivs 1" equals "$(proc_field NoNewPrivs)" 1
check "CapabilityBoundingSet= empty: CapBnd and CapEff all zero" \
    equals "$(proc_field CapBnd) $(proc_field CapEff)" "0000000000000000 0000000000000000"
check "SystemCallFilter: the agent runs under seccomp (Seccomp 2)" equals "$(proc_field Seccomp)" 2
EA_UID=$(in_ct id -u edge-agent)
VIDEO_GID=$(in_ct getent group video | cut -d: -f3)
check "runs as edge-agent (uid $EA_UID) with the video group (gid $VIDEO_GID) added" \
    sh -c "[ \"\$(echo \$1 | cut -d' ' -f1)\" = $EA_UID ] && echo \" \$2 \" | grep -q ' $VIDEO_GID '" _ "$(proc_field Uid)" "$(proc_field Groups)"
# in the service's own mount namespace, as root even: what ProtectSystem=strict and
# friends leave writable
# (MainPID is a pid of the machine's namespace: nsenter runs inside the machine)
in_svc() { in_ct nsenter -t "$MAIN" -m -- "$@"; }
as_svc() { in_ct nsenter -t "$MAIN" -m -S "$EA_UID" -G "$(in_ct id -g edge-agent)" -- "$@"; }
# ro_in_svc PATH...: a root write to each PATH in the service's namespace gets EROFS
ro_in_svc() {
    for _p in "$@"; do
        _out=$(in_svc touch "$_p" 2>&1) && { echo "$_p: write succeeded"; in_svc rm -f "$_p"; return 1; }
        printf '%s\n' "$_out" | grep -q 'Read-only file system' || { echo "$_out"; return 1; }
    done
}
check "ProtectSystem=strict: writes to /opt/edge-agent, /usr, /etc fail in the service (even as root: EROFS)" \
    ro_in_svc /opt/edge-agent/probe /usr/probe /etc/probe /var/lib/probe
# ConfigurationDirectory= keeps /etc/edge-agent a writable mount in the service; what keeps
# the agent from rewriting its own config (repository URL, tokens) is ownership
user_cannot_write_config() {
    _out=$(as_svc touch /etc/edge-agent/probe 2>&1) && { echo "the service user wrote /etc/edge-agent"; in_svc rm -f /etc/edge-agent/probe; return 1; }
    echo "$_out"
    printf '%s' "$_out" | grep -q 'Permission denied'
}
check "/etc/edge-agent (ConfigurationDirectory=, root:root 0755): the service user cannot write it" \
    user_cannot_write_config
check "StateDirectory is writable for the service user" \
    as_svc sh -c 'echo x > /var/lib/edge-agent/.probe && rm /var/lib/edge-agent/.probe'
home_hidden() {
    _out=$(in_svc touch /root/probe 2>&1) && { echo "write to /root succeeded"; return 1; }
    echo "$_out"
    printf '%s' "$_out" | grep -q 'Read-only file system\|Permission denied' || return 1
    [ -z "$(in_svc ls -A /home 2>/dev/null)" ]
}
check "ProtectHome=yes: /root unwritable and /home empty in the service" home_hidden
check "PrivateTmp=yes: the service's /tmp is not the machine's /tmp" \
    sh -c "nsenter -t $INIT -a nsenter -t $MAIN -m -- touch /tmp/ea-private-probe && ! test -e '$ROOT/tmp/ea-private-probe'"
skip "ProtectKernelModules/ProtectClock/ProtectKernelTunables: nspawn already denies these to the whole machine, so a refusal inside it would not show the unit's own effect"
skip "camera and sensor access (video group, /sys thermal zones): the container has no /dev/video* and no thermal zones"

# ------------------------------------------------------------------ reload
reload_state() {
    in_ct python3 -c 'import json, sys
s = json.load(open("/run/edge-agent/status.json"))
r = s.get("last_reload") or {}
print(s["pid"], s["fps_cap"], r.get("ok"))'
}
BEFORE_PID=$(sd_show MainPID)
write_config "$DIGITS" 7
in_ct systemctl reload edge-agent
wait_for 20 sh -c "reload_state_out=\$(nsenter -t $INIT -a python3 -c 'import json; s=json.load(open(\"/run/edge-agent/status.json\")); print(s[\"fps_cap\"])'); [ \"\$reload_state_out\" = 7.0 ] || [ \"\$reload_state_out\" = 7 ]"
check "systemctl reload, good config: fps cap 10 -> 7, same pid ($(reload_state))" \
    sh -c "set -- $(reload_state); [ \"\$1\" = $BEFORE_PID ] && [ \"\$3\" = True ] && { [ \"\$2\" = 7.0 ] || [ \"\$2\" = 7 ]; }"
cp "$CONF" "$WORK/good.yaml"
printf 'scheduler: {fps_cap: -3}\n' >>"$CONF"
in_ct systemctl reload edge-agent
refused() { journal_cat | grep -q 'reload refused, keeping the running config'; }
wait_for 20 refused
check "systemctl reload, bad config: the refusal is in the journal" refused
status_refused() { [ "$(reload_state | cut -d' ' -f3)" = False ]; }
wait_for 20 status_refused
check "... the service keeps running, same pid, old cap 7 ($(reload_state))" \
    sh -c "set -- $(reload_state); [ \"\$1\" = $BEFORE_PID ] && [ \"\$3\" = False ] && { [ \"\$2\" = 7.0 ] || [ \"\$2\" = 7 ]; } && [ '$(in_ct systemctl is-active edge-agent)' = active ]"
cp "$WORK/good.yaml" "$CONF"
journal_cat | grep -i 'reload' | tail -n 2 | sed 's/^/      journal: /'

# ------------------------------------------------------------------ watchdog
cp "$ROOT/root/ea/hang.onnx" "$ROOT/var/lib/edge-agent/hang.onnx"
chown --reference="$ROOT/var/lib/edge-agent" "$ROOT/var/lib/edge-agent/hang.onnx"
write_config /var/lib/edge-agent/hang.onnx 10
restart_unit
HANG_PID=$(sd_show MainPID)
log "frame loop hung in ORT (pid $HANG_PID); waiting for the watchdog (WatchdogSec=$(sd_show WatchdogUSec))"
stalled() { in_ct edge-agent status --config /etc/edge-agent/agent.yaml --json | grep -q '"state": *"stalled"'; }
wait_for 60 stalled
check "hung frame loop: status says stalled while systemd still sees the process" stalled
watchdog_fired() { journal_cat | grep -q 'Watchdog timeout'; }
wait_for 120 watchdog_fired
check "the watchdog fires: \"$(journal_cat | grep 'Watchdog timeout' | tail -n 1)\"" watchdog_fired
restarted() { [ "$(sd_show NRestarts)" -ge 1 ] && [ "$(sd_show MainPID)" != "$HANG_PID" ] && [ "$(sd_show MainPID)" != 0 ]; }
wait_for 60 restarted
check "... and systemd restarts it (NRestarts $(sd_show NRestarts), pid $HANG_PID -> $(sd_show MainPID))" restarted
write_config "$DIGITS" 10
restart_unit
check "back on the good model: active" equals "$(in_ct systemctl is-active edge-agent)" active

# ------------------------------------------------------------------ OTA through the service
cp -r "$ROOT/root/ea/golden" "$ROOT/var/lib/edge-agent/golden"
mkdir -p "$ROOT/var/lib/edge-agent/incoming"
cp "$ROOT"/root/ea/dist/digits-1.*.tar "$ROOT/var/lib/edge-agent/incoming/"
OTA_YAML="ota: {enabled: true, repository_url: 'http://127.0.0.1:9', channel: stable, poll_interval_s: 3600, golden_dir: /var/lib/edge-agent/golden, probation_frames: 20, probation_s: 1}"
write_config "$DIGITS" 20 "$OTA_YAML"
check "provision: keyring and TUF root (edge-agent provision)" \
    in_ct edge-agent -q provision --config /etc/edge-agent/agent.yaml --tuf-root /root/ea/repo/metadata/1.root.json \
        --keyring /root/ea/keyring/ --device-id nspawn-1
in_ct chown -R edge-agent:edge-agent /var/lib/edge-agent
restart_unit
OTA_PID=$(sd_show MainPID)
status_field() { in_ct edge-agent status --config /etc/edge-agent/agent.yaml --json | in_ct python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"; }
# a package in the caller's /tmp: the service has PrivateTmp=yes and cannot see it
cp "$ROOT/var/lib/edge-agent/incoming/digits-1.0.0.tar" "$ROOT/tmp/digits-1.0.0.tar"
TMP_OUT=$(in_ct edge-agent install /tmp/digits-1.0.0.tar --config /etc/edge-agent/agent.yaml 2>&1)
TMP_RC=$?
check "install of a package in /tmp is refused with an error (PrivateTmp: exit $TMP_RC): $(printf '%s' "$TMP_OUT" | head -n 1)" \
    sh -c "[ $TMP_RC != 0 ] && printf '%s' \"\$1\" | grep -q '^Error: '" _ "$TMP_OUT"
for v in 1.0.0 1.1.0; do
    OUT=$(in_ct edge-agent install "/var/lib/edge-agent/incoming/digits-$v.tar" --config /etc/edge-agent/agent.yaml 2>&1)
    RC=$?
    check "edge-agent install digits-$v.tar through the control socket (exit $RC): $(printf '%s' "$OUT" | tail -n 1)" \
        equals "$RC" 0
    committed() { [ "$(status_field 's["model"]["version"]+" "+s["ota"]["state"]')" = "$v COMMITTED" ]; }
    wait_for 90 committed
    check "... the service runs digits $v, COMMITTED, hot-swapped in the same process (pid $OTA_PID)" \
        sh -c "[ '$(status_field 's["model"]["version"]+" "+s["ota"]["state"]')' = '$v COMMITTED' ] && [ '$(sd_show MainPID)' = $OTA_PID ]"
done
if [ -n "$STATUS_OUT" ]; then
    in_ct systemctl status edge-agent --no-pager --lines=8 >"$STATUS_OUT" 2>&1
fi
printf 'systemctl status edge-agent:\n'
in_ct systemctl status edge-agent --no-pager --lines=4 | sed 's/^/      /'

# ------------------------------------------------------------------ Restart= limits
# a crash at every start (SIGKILL at the model load of the installed package)
# (in /etc: the machine's /run is its own tmpfs, not the folder under $ROOT)
DROPIN=$ROOT/etc/systemd/system/edge-agent.service.d
mkdir -p "$DROPIN"
printf '[Service]\nEnvironment=EDGE_AGENT_KILL_AT=model.load:digits-1.1.0\n' >"$DROPIN/crash.conf"
in_ct systemctl daemon-reload
in_ct systemctl reset-failed edge-agent 2>/dev/null
in_ct systemctl restart --no-block edge-agent
log "crash at every start: waiting for the start limit ($(sd_show StartLimitBurst) in $(sd_show StartLimitIntervalUSec))"
# systemd 252 keeps the crash's Result (signal) and logs the refusal of the 6th start
limit_hit() { [ "$(sd_show ActiveState)" = failed ] && journal_cat | grep -q 'Start request repeated too quickly'; }
wait_for 240 limit_hit
STARTS=$(journal_cat | grep -c 'EDGE_AGENT_KILL_AT\|code=killed, status=9/KILL')
check "crash at start, Restart=on-failure, RestartSec=5: 5 starts killed, the 6th refused (\"Start request repeated too quickly\", failed, NRestarts $(sd_show NRestarts), result $(sd_show Result))" \
    sh -c "[ '$(sd_show ActiveState)' = failed ] && [ '$(sd_show NRestarts)' = 5 ] && [ '$STARTS' -ge 5 ] && nsenter -t $INIT -a journalctl -u edge-agent -o cat --no-pager | grep -q 'Start request repeated too quickly'"
rm -rf "$DROPIN"
in_ct systemctl daemon-reload
check "after systemctl reset-failed and the crash gone: active again on digits 1.1.0" \
    sh -c "nsenter -t $INIT -a systemctl reset-failed edge-agent; nsenter -t $INIT -a systemctl start edge-agent && [ \"\$(nsenter -t $INIT -a systemctl is-active edge-agent)\" = active ]"

# ------------------------------------------------------------------ apt remove / purge
RUN_PID=$(sd_show MainPID)
check "apt-get remove edge-agent" in_ct apt-get remove -y -q edge-agent
check "after remove: the service is stopped (inactive) and its process gone" \
    sh -c "[ \"\$(nsenter -t $INIT -a systemctl is-active edge-agent)\" != active ] && ! nsenter -t $INIT -a kill -0 $RUN_PID 2>/dev/null"
check "after remove: /var/lib/edge-agent kept (models, journal, keyring)" \
    test -d "$ROOT/var/lib/edge-agent/models" -a -d "$ROOT/var/lib/edge-agent/keyring"
check "after remove: /etc/edge-agent/agent.yaml kept" test -f "$CONF"
check "after remove: /opt/edge-agent and /usr/bin/edge-agent gone" \
    sh -c "! test -e '$ROOT/opt/edge-agent' && ! test -L '$ROOT/usr/bin/edge-agent'"
check "after remove: the unit is masked (docs/install.md: stopped, masked)" \
    equals "$(in_ct systemctl is-enabled edge-agent 2>&1)" masked
check "apt-get purge edge-agent" in_ct apt-get purge -y -q edge-agent
check "after purge: /var/lib/edge-agent gone" sh -c "! test -e '$ROOT/var/lib/edge-agent'"
check "after purge: /etc/edge-agent gone" sh -c "! test -e '$ROOT/etc/edge-agent'"
check "after purge: the edge-agent user is kept (Debian policy)" in_ct getent passwd edge-agent
check "after purge: no unit left (not found, not masked)" \
    sh -c "! nsenter -t $INIT -a systemctl is-enabled edge-agent >/dev/null 2>&1"
check "after purge: /var/log/edge-agent (LogsDirectory=) gone" sh -c "! test -e '$ROOT/var/log/edge-agent'"
if in_ct test -e /run/edge-agent; then
    printf 'note  after purge: /run/edge-agent is still there (RuntimeDirectoryPreserve=yes; tmpfs, gone at the next boot)\n'
fi

stop_machine
check "the machine shut down cleanly (systemd-nspawn exit $NSPAWN_RC)" sh -c "[ '$NSPAWN_RC' = 0 ] || { tail -n 5 '$WORK/boot.log'; false; }"
printf 'systemd-test: %s passed, %s failed, %s skipped in %s s\n' "$PASSED" "$FAILED" "$SKIPPED" "$(elapsed)"
[ "$FAILED" = 0 ]
