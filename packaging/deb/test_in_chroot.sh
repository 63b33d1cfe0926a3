#!/bin/sh
# Installs an edge-agent .deb with apt into a clean Debian chroot and checks install, remove, purge.
set -eu

usage() {
    cat <<'USAGE'
Usage: packaging/deb/test_in_chroot.sh [options] DEB

Makes a clean Debian root (debootstrap --variant=minbase), installs DEB into it with
`apt-get install ./DEB` (dependencies from the Debian mirror), and checks what the
package promises: the edge-agent system user and its groups, /var/lib/edge-agent
(edge-agent:edge-agent 0750), the conffile /etc/edge-agent/agent.yaml (root:edge-agent
0640, kept with an admin's edit on reinstall), the unit enabled, the guides in
/usr/share/doc/edge-agent, `edge-agent --version`, `edge-agent doctor` and `config check`
run as the service user; then `dpkg -r` keeps /var/lib/edge-agent and the config and
`dpkg -P` deletes both. Needs root (chroot, mount) and debootstrap unless --base is given.
Prints one line per check; exit 0 when all pass, 1 when one fails, 2 for bad usage.

Options:
  --base DIR     copy this existing debootstrap tree instead of making one (faster)
  --suite NAME   Debian suite for debootstrap (default: bookworm; match the build host)
  --mirror URL   Debian mirror (default: http://deb.debian.org/debian)
  --keep         keep the chroot afterwards (its path is printed)
  -h, --help     this text

Example:
  sudo packaging/deb/test_in_chroot.sh dist/edge-agent_0.1.0_amd64.deb
USAGE
}

die() { printf 'Error: %s\n' "$*" >&2; exit 2; }

BASE=""
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
KEEP=0
DEB=""
while [ $# -gt 0 ]; do
    case "$1" in
        --base) BASE=${2:?--base needs a folder}; shift 2 ;;
        --suite) SUITE=${2:?--suite needs a name}; shift 2 ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option $1 (packaging/deb/test_in_chroot.sh)" ;;
        *) [ -z "$DEB" ] || die "one .deb at a time ($DEB and $1)"; DEB=$1; shift ;;
    esac
done
[ -n "$DEB" ] || { usage >&2; die "no .deb given (packaging/deb/test_in_chroot.sh)"; }
[ -f "$DEB" ] || die "$DEB: .deb not found"
[ "$(id -u)" = 0 ] || die "needs root for chroot and mount (run with sudo)"
command -v chroot >/dev/null || die "chroot not found (apt install coreutils)"
if [ -n "$BASE" ]; then
    [ -x "$BASE/usr/bin/apt-get" ] || die "$BASE: not a Debian root (no usr/bin/apt-get)"
else
    command -v debootstrap >/dev/null || die "debootstrap not found (apt install debootstrap) or use --base"
fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-agent-chroot.XXXXXX")
ROOTFS=$WORK/root

cleanup() {
    # never delete a tree while the host's /proc is still mounted inside it
    if mountpoint -q "$ROOTFS/proc" 2>/dev/null; then
        umount "$ROOTFS/proc" 2>/dev/null || umount -l "$ROOTFS/proc" || return 0
    fi
    if [ "$KEEP" = 1 ]; then
        printf 'chroot kept: %s\n' "$ROOTFS" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

if [ -n "$BASE" ]; then
    printf 'copying %s\n' "$BASE" >&2
    cp -a "$BASE" "$ROOTFS"
else
    printf 'debootstrap --variant=minbase %s (%s)\n' "$SUITE" "$MIRROR" >&2
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
fi
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount -t proc proc "$ROOTFS/proc"
DEB_NAME=$(basename "$DEB")
cp "$DEB" "$ROOTFS/tmp/$DEB_NAME"

# in_root CMD...: run in the chroot with a clean environment, as apt would on a device
in_root() {
    chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

PASSED=0
FAILED=0
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
equals() { [ "$1" = "$2" ] || { printf 'got "%s", want "%s"\n' "$1" "$2"; return 1; }; }

printf 'apt-get install ./%s\n' "$DEB_NAME" >&2
in_root apt-get update -qq >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get update failed in the chroot"; }
check "apt-get install ./$DEB_NAME (dependencies from $SUITE)" \
    in_root apt-get install -y -q --no-install-recommends "/tmp/$DEB_NAME"
check "dpkg says installed" \
    sh -c "test \"\$(chroot '$ROOTFS' dpkg-query -W -f='\${db:Status-Abbrev}' edge-agent)\" = 'ii '"

VERSION=$(dpkg-deb -f "$DEB" Version)
# user and groups
PASSWD=$(in_root getent passwd edge-agent || true)
check "system user edge-agent exists" test -n "$PASSWD"
check "its home is /var/lib/edge-agent, shell nologin" \
    equals "$(printf '%s' "$PASSWD" | cut -d: -f6,7)" "/var/lib/edge-agent:/usr/sbin/nologin"
check "its uid is a system uid (< 1000)" test "$(printf '%s' "$PASSWD" | cut -d: -f3)" -lt 1000
check "group edge-agent exists" in_root getent group edge-agent
# minbase has a video group (from base-passwd): the camera needs it
check "edge-agent is in the video group" \
    sh -c "chroot '$ROOTFS' id -nG edge-agent | tr ' ' '\n' | grep -qx video"

# files, owners, modes
stat_of() { in_root stat -c '%U:%G %a %F' "$1"; }
check "/var/lib/edge-agent edge-agent:edge-agent 0750" \
    equals "$(stat_of /var/lib/edge-agent)" "edge-agent:edge-agent 750 directory"
check "/etc/edge-agent/agent.yaml root:edge-agent 0640" \
    equals "$(stat_of /etc/edge-agent/agent.yaml)" "root:edge-agent 640 regular file"
check "agent.yaml is a conffile" \
    sh -c "chroot '$ROOTFS' dpkg-query -W -f='\${Conffiles}' edge-agent | grep -q ' /etc/edge-agent/agent.yaml '"
check "unit in /lib/systemd/system" test -f "$ROOTFS/lib/systemd/system/edge-agent.service"
check "unit enabled (multi-user.target.wants link)" \
    test -L "$ROOTFS/etc/systemd/system/multi-user.target.wants/edge-agent.service"
DOC_URL=$(sed -n 's#^Documentation=file://##p' "$ROOTFS/lib/systemd/system/edge-agent.service" 2>/dev/null || true)
check "the unit's Documentation= file is installed ($DOC_URL)" test -s "$ROOTFS$DOC_URL"
check "guides in /usr/share/doc/edge-agent" \
    test -f "$ROOTFS/usr/share/doc/edge-agent/install.md" -a -f "$ROOTFS/usr/share/doc/edge-agent/README.md"

# the command, as root and as the service user
check "edge-agent --version prints $VERSION" \
    sh -c "chroot '$ROOTFS' /usr/bin/edge-agent --version | grep -qF '$VERSION'"
as_agent() { in_root runuser -u edge-agent -- "$@"; }
check "config check of the conffile as edge-agent" \
    as_agent /usr/bin/edge-agent config check /etc/edge-agent/agent.yaml
# doctor exits 3 on a blocking problem; inside a bare chroot the checks that matter
# here (the package's own user, dirs, backends) must not be among them
as_agent /usr/bin/edge-agent doctor --json >"$WORK/doctor.json" 2>"$WORK/doctor.err" && DOCTOR_RC=0 || DOCTOR_RC=$?
cp "$WORK/doctor.json" "$ROOTFS/tmp/doctor.json"
check "edge-agent doctor --json runs as edge-agent (exit $DOCTOR_RC)" \
    sh -c "[ $DOCTOR_RC = 0 ] || [ $DOCTOR_RC = 3 ] || { cat '$WORK/doctor.err'; exit 1; }"
doctor_row() {
    in_root python3 -c 'import json, sys
rows = {c["name"]: c for c in json.load(open("/tmp/doctor.json"))["checks"]}
row = rows[sys.argv[1]]
print(row["status"], row["detail"])
sys.exit(0 if row["status"] in sys.argv[2].split(",") else 1)' "$1" "$2"
}
check "doctor: service user ok" doctor_row "service user" ok
check "doctor: state dir ok" doctor_row "state dir" ok
check "doctor: backend onnx ok" doctor_row "backend onnx" ok
check "doctor: numpy ok" doctor_row numpy ok
printf 'doctor (exit %s):\n' "$DOCTOR_RC"
in_root python3 -c 'import json
for c in json.load(open("/tmp/doctor.json"))["checks"]:
    print("      %-16s %-5s %s" % (c["name"], c["status"].upper(), c["detail"][:80]))'

# reinstall with an admin's edit in the conffile: dpkg keeps it without asking
printf 'log_level: DEBUG\n' >"$ROOTFS/etc/edge-agent/agent.yaml"
printf 'journal' >"$ROOTFS/var/lib/edge-agent/state.db"
check "reinstall (dpkg -i again) succeeds" in_root dpkg -i "/tmp/$DEB_NAME"
check "reinstall keeps the edited conffile" \
    equals "$(cat "$ROOTFS/etc/edge-agent/agent.yaml")" "log_level: DEBUG"

# remove keeps state and config; purge deletes them
check "dpkg -r edge-agent" in_root dpkg -r edge-agent
check "after remove: package in state rc (config files kept)" \
    sh -c "test \"\$(chroot '$ROOTFS' dpkg-query -W -f='\${db:Status-Abbrev}' edge-agent)\" = 'rc '"
check "after remove: /var/lib/edge-agent kept with its data" \
    equals "$(cat "$ROOTFS/var/lib/edge-agent/state.db" 2>&1)" "journal"
check "after remove: /etc/edge-agent/agent.yaml kept" test -f "$ROOTFS/etc/edge-agent/agent.yaml"
check "after remove: /opt/edge-agent and /usr/bin/edge-agent gone" \
    sh -c "! test -e '$ROOTFS/opt/edge-agent' && ! test -L '$ROOTFS/usr/bin/edge-agent'"
check "dpkg -P edge-agent" in_root dpkg -P edge-agent
check "after purge: /var/lib/edge-agent gone" sh -c "! test -e '$ROOTFS/var/lib/edge-agent'"
check "after purge: /etc/edge-agent gone" sh -c "! test -e '$ROOTFS/etc/edge-agent'"
check "after purge: dpkg no longer knows edge-agent" \
    sh -c "! chroot '$ROOTFS' dpkg-query -W edge-agent >/dev/null 2>&1"
check "after purge: the edge-agent user is kept (Debian policy)" in_root getent passwd edge-agent

printf 'chroot-test: %s passed, %s failed\n' "$PASSED" "$FAILED"
[ "$FAILED" = 0 ]
