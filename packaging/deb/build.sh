#!/bin/sh
# Builds edge-agent_<version>_<arch>.deb with dpkg-deb from a staging tree (venv in /opt).
set -eu

usage() {
    cat <<'USAGE'
Usage: packaging/deb/build.sh [options]

Builds dist/edge-agent_<version>_<arch>.deb: the agent in a venv at /opt/edge-agent/venv,
the systemd unit, /etc/edge-agent/agent.yaml (conffile), the guides in
/usr/share/doc/edge-agent (the unit's Documentation=), the edge-agent system user and
/var/lib/edge-agent (created by postinst). Build on the target's distribution and
architecture: the venv holds compiled wheels and links to that system's python3.

Options:
  --out DIR          where the .deb goes (default: dist/)
  --unit FILE        systemd unit to ship (default: systemd/edge-agent.service)
  --wheel FILE       use this edge-agent wheel instead of building one
  --python PATH      the target's python3 that the venv links to (default: /usr/bin/python3)
  --jetson           venv with --system-site-packages; JetPack's onnxruntime-gpu and
                     TensorRT are used instead of pip's onnxruntime (env EDGE_AGENT_JETSON=1)
  --extras LIST      pip extras to add, comma-separated (default: litert; "" for none)
  --no-deps          install only the agent wheel, no dependencies (tests; or with --jetson
                     when the system provides every dependency)
  --wheelhouse DIR   install dependencies offline from this folder (pip --no-index)
  --keep-stage       keep the staging tree (printed) for inspection
  -q, --quiet        no progress lines (errors and warnings still show)
  -h, --help         this text

Example:
  packaging/deb/build.sh --out dist && sudo apt install ./dist/edge-agent_0.1.0_arm64.deb
USAGE
}

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../lib/common.sh
EA_LIB_DIR=$REPO/packaging/lib
. "$REPO/packaging/lib/common.sh"

OUT_DIR=$REPO/dist
WHEEL=""
PYTHON=/usr/bin/python3
JETSON=${EDGE_AGENT_JETSON:-0}
NO_DEPS=0
# LiteRT is the Raspberry Pi backend; its wheel exists for aarch64 and x86-64 Linux.
EXTRAS=litert
WHEELHOUSE=""
KEEP_STAGE=0
QUIET=0
STEPS=5
STARTED=$(date +%s)
BUILD_PYTHON=${BUILD_PYTHON:-python3}
UNIT_SRC=$REPO/systemd/edge-agent.service

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
        --unit) UNIT_SRC=${2:?--unit needs a file}; shift 2 ;;
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
        --jetson) JETSON=1; shift ;;
        --extras) EXTRAS=${2?--extras needs a list}; shift 2 ;;
        --no-deps) NO_DEPS=1; shift ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
        --keep-stage) KEEP_STAGE=1; shift ;;
        -q|--quiet) QUIET=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; ea_die "unknown option $1 (packaging/deb/build.sh)" ;;
    esac
done

command -v dpkg-deb >/dev/null || ea_die "dpkg-deb not found (apt install dpkg)"
[ -x "$PYTHON" ] || ea_die "$PYTHON: no python3 there (use --python)"
[ -f "$UNIT_SRC" ] || ea_die "$UNIT_SRC: the systemd unit is missing"
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || ea_die "$WHEEL: wheel not found"
[ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || ea_die "$WHEELHOUSE: wheelhouse not found"

VERSION=$(ea_project_version "$REPO")
[ -n "$VERSION" ] || ea_die "$REPO/pyproject.toml: no version"
ARCH=$(dpkg --print-architecture)
PY_MINOR=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The venv's site-packages is lib/python3.X: the package needs that exact minor version.
PY_NEXT=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
MAINTAINER=${DEB_MAINTAINER:-edge-agent developers <edge-agent@example.org>}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

# One line per step on stderr (the .deb path stays the only stdout line): what runs,
# how far along, how long so far, and the staged size once it is known.
step() {
    [ "$QUIET" = 1 ] && return 0
    ea_log "deb: [$1/$STEPS] $(( $1 * 100 / STEPS - 100 / STEPS ))% $2 ($(( $(date +%s) - STARTED )) s so far)"
}

WORK=$(mktemp -d)
STAGE=$WORK/stage
# shellcheck disable=SC2064  # expand now: the paths are fixed
[ "$KEEP_STAGE" = 1 ] || trap "rm -rf '$WORK'" EXIT
mkdir -p "$STAGE"

step 1 "building the edge-agent wheel"
if [ -z "$WHEEL" ]; then
    WHEEL=$(ea_build_wheel "$REPO" "$WORK/wheel" "$BUILD_PYTHON")
fi

set --
[ -n "$WHEELHOUSE" ] && set -- --no-index --find-links "$WHEELHOUSE"
step 2 "installing the venv in /opt/edge-agent/venv (pip; the longest step)"
ea_make_venv "$STAGE/opt/edge-agent/venv" /opt/edge-agent/venv "$PYTHON" "$WHEEL" \
    "$JETSON" "$NO_DEPS" "$EXTRAS" "$@"
# A venv's python is a symlink to the system interpreter it was made with; the package
# depends on that exact python3.X, so the symlink must point at /usr/bin, not at a
# pyenv or build-host path.
case "$(readlink "$STAGE/opt/edge-agent/venv/bin/python")" in
    /usr/bin/*|python3*) ;;
    *) ea_log "warning: the venv's python links outside /usr/bin ($PYTHON); the .deb will not run elsewhere" ;;
esac

step 3 "adding the unit, the default config and the docs ($(du -sm "$STAGE" | cut -f1) MB staged)"
install -d "$STAGE/usr/bin"
ln -s /opt/edge-agent/venv/bin/edge-agent "$STAGE/usr/bin/edge-agent"

install -D -m 0644 "$UNIT_SRC" "$STAGE/lib/systemd/system/$EA_SERVICE"

install -d -m 0755 "$STAGE/etc/edge-agent"
"$STAGE/opt/edge-agent/venv/bin/python" -m agent.cli config init --out "$STAGE/etc/edge-agent/agent.yaml" >/dev/null 2>&1 \
    || "$BUILD_PYTHON" -m agent.cli config init --out "$STAGE/etc/edge-agent/agent.yaml" >/dev/null \
    || ea_die "cannot write the default config"
chmod 0644 "$STAGE/etc/edge-agent/agent.yaml"

DOC=$STAGE/usr/share/doc/edge-agent
ea_install_docs "$REPO" "$DOC"
install -m 0644 "$HERE/copyright" "$DOC/copyright"
DATE_R=$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}")
printf 'edge-agent (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- %s  %s\n' \
    "$VERSION" "$VERSION" "$MAINTAINER" "$DATE_R" | gzip -9n > "$DOC/changelog.gz"
chmod 0644 "$DOC/changelog.gz"
install -D -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/edge-agent"

install -d "$STAGE/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
echo /etc/edge-agent/agent.yaml > "$STAGE/DEBIAN/conffiles"

step 4 "writing the control file"
FLAVOR="generic"
[ "$JETSON" = 1 ] && FLAVOR="Jetson (uses JetPack's system onnxruntime-gpu and TensorRT)"
SIZE_KB=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $SIZE_KB
Depends: libc6 (>= 2.28), python3 (>= $PY_MINOR), python3 (<< $PY_NEXT), adduser, init-system-helpers (>= 1.52)
Recommends: systemd
Section: misc
Priority: optional
Description: on-device inference agent with signed, gated OTA model updates
 edge-agent runs a quantized model (ONNX Runtime, LiteRT, TensorRT) under an
 FPS cap and a thermal governor, keeps telemetry in SQLite while offline, and
 installs signed model packages only after a golden-set regression gate passes.
 .
 Build flavor: $FLAVOR. Python $PY_MINOR venv in /opt/edge-agent
 (extras: ${EXTRAS:-none}).
CONTROL

DEB=$OUT_DIR/edge-agent_${VERSION}_${ARCH}.deb
step 5 "compressing $(( SIZE_KB / 1024 )) MB with ${DEB_COMPRESSION:-xz} into $DEB"
# --root-owner-group: every file root:root without needing fakeroot or root.
# DEB_COMPRESSION=gzip builds faster (tests, CI); xz makes the smaller download.
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$STAGE" "$DEB" >&2
[ "$KEEP_STAGE" = 1 ] && ea_log "staging tree kept: $STAGE"
[ "$QUIET" = 1 ] || ea_log "deb: 100% done: $(( $(stat -c %s "$DEB") / 1024 )) kB in $(( $(date +%s) - STARTED )) s"
echo "$DEB"
