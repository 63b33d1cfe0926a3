#!/usr/bin/env bash
# Runs the test suite on Python 3.13 in a Debian 13 (trixie) root: a venv there with the dev extra and that Python's own numpy.
set -uo pipefail

usage() {
    cat <<'USAGE'
Usage: packaging/deb/test_python313.sh [options] [-- PYTEST_ARGS...]

Makes (or unpacks from the cache) a Debian 13 root, whose python3 is 3.13 (the Python of
Raspberry Pi OS 13), copies the checkout's tracked files into it, creates a venv with
`pip install -e '.[litert,dev]'` (wheels for that Python from PyPI) and runs
`python -m pytest -q` there (default arguments: -q -p no:cacheprovider). Prints the
interpreter, numpy and onnxruntime versions and pytest's summary; exit status is pytest's
(77 when this machine cannot run it: no root, no debootstrap, no mount rights).

Options:
  --cache DIR    keeps the debootstrap tree as a tarball (default: /var/cache/edge-agent-test,
                 env EDGE_AGENT_TEST_CACHE)
  --mirror URL   Debian mirror (default: http://deb.debian.org/debian)
  --keep         keep the root afterwards (its path is printed)
  -h, --help     this text

Example:
  sudo nice -n 10 packaging/deb/test_python313.sh -- -q tests/daemon
USAGE
}

die() { printf 'Error: %s\n' "$*" >&2; exit 2; }
skip_all() { printf 'skip  the Python 3.13 suite: %s\n' "$*"; exit 77; }

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${EDGE_AGENT_TEST_CACHE:-/var/cache/edge-agent-test}
MIRROR=http://deb.debian.org/debian
KEEP=0
SUITE=trixie
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=${2:?--cache needs a folder}; shift 2 ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) usage >&2; die "unknown option $1 (packaging/deb/test_python313.sh)" ;;
    esac
done
[ $# -gt 0 ] || set -- -q -p no:cacheprovider
[ "$(id -u)" = 0 ] || skip_all "needs root (debootstrap, chroot, mount)"
TAR=$CACHE/$SUITE-amd64-python.tar
[ -f "$TAR" ] || command -v debootstrap >/dev/null || skip_all "debootstrap not found (apt install debootstrap)"

T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
log() { printf '[%4ss] %s\n' "$(elapsed)" "$*" >&2; }
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-agent-py313.XXXXXX")
ROOT=$WORK/root
cleanup() {
    rc=$?
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

mkdir -p "$CACHE"
if [ -f "$TAR" ]; then
    log "unpacking the cached $SUITE root ($TAR)"
    mkdir -p "$ROOT" && tar -xpf "$TAR" -C "$ROOT" || die "cannot unpack $TAR"
else
    log "debootstrap $SUITE (cold cache: $TAR is made for the next run)"
    # dpkg-dev, fakeroot and systemd: the packaging tests use them (they skip without); lintian
    # is left out: its perl SSL modules fail to configure under debootstrap 1.0.128 (bookworm)
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-dev,ca-certificates,git,dpkg-dev,systemd,fakeroot,adduser \
        "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
    tar -cpf "$TAR.part" -C "$ROOT" . && mv "$TAR.part" "$TAR" || log "warning: could not write the cache $TAR"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# pip inside reaches PyPI the way this machine does: through the same CA bundle (a
# TLS-inspecting proxy's CA is in it where there is one)
cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ROOT/etc/ssl/host-ca.pem" \
    || die "cannot copy this machine's CA bundle into the root"
mount -t proc proc "$ROOT/proc" || skip_all "cannot mount /proc in the root (no mount rights)"
mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev" || skip_all "cannot bind /dev into the root"
mount -t tmpfs -o size=2g tmpfs "$ROOT/tmp" || die "cannot mount a tmpfs on the root's /tmp"

in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_CERT=/etc/ssl/host-ca.pem SSL_CERT_FILE=/etc/ssl/host-ca.pem PIP_RETRIES=10 "$@"
}
PYV=$(in_root python3 -c 'import platform; print(platform.python_version())')
log "python3 in the $SUITE root: $PYV"
case "$PYV" in 3.13.*) ;; *) die "the $SUITE root has Python $PYV, not 3.13" ;; esac

# the checkout's tracked files (and untracked, not ignored ones) as they are now
mkdir -p "$ROOT/root/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar cf - --no-recursion) \
    | tar xf - -C "$ROOT/root/src" || die "cannot copy the checkout"
log "pip install -e '.[litert,dev]' on Python $PYV"
T_PIP=$(date +%s)
in_root sh -c 'cd /root/src && python3 -m venv /root/venv && /root/venv/bin/python -m pip install -q --upgrade pip && /root/venv/bin/python -m pip install -q -e ".[litert,dev]"' \
    >"$WORK/pip.log" 2>&1 || { tail -n 30 "$WORK/pip.log" >&2; die "pip install failed on Python $PYV (log above)"; }
T_PIP=$(($(date +%s) - T_PIP))
VERS=$(in_root /root/venv/bin/python -c 'import sys, numpy, onnxruntime; from importlib.metadata import version; print("python", sys.version.split()[0], "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__, "ai-edge-litert", version("ai-edge-litert"))')
printf 'versions: %s (pip install %s s)\n' "$VERS" "$T_PIP"
in_root sh -c 'cd /root/src && /root/venv/bin/python tools/build_demo_models.py --check' \
    && printf 'ok    tools/build_demo_models.py --check on %s\n' "$PYV" \
    || printf 'FAIL  tools/build_demo_models.py --check on %s\n' "$PYV"
log "pytest $*"
T_TEST=$(date +%s)
in_root sh -c 'cd /root/src && exec /root/venv/bin/python -m pytest "$@"' pytest "$@" >"$WORK/pytest.log" 2>&1
RC=$?
# the whole log outlives the root: the tracebacks are what a failure needs
LOG_KEEP=${TMPDIR:-/var/tmp}/edge-agent-py313-pytest.log
cp "$WORK/pytest.log" "$LOG_KEEP" && printf 'pytest log: %s\n' "$LOG_KEEP"
grep -E '^(FAILED|ERROR) ' "$WORK/pytest.log" | head -n 40
tail -n 3 "$WORK/pytest.log"
printf 'python313-test: pytest exit %s on Python %s in %s s (total %s s)\n' "$RC" "$PYV" "$(($(date +%s) - T_TEST))" "$(elapsed)"
exit "$RC"
