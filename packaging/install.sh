#!/bin/sh
# Installs edge-agent without apt: a venv, the systemd unit, config, user and state dir.
set -eu

usage() {
    cat <<'USAGE'
Usage: packaging/install.sh [options]

Installs the same layout as the .deb, for devices without apt packaging: a venv at
<prefix>/venv (pip), /usr/local/bin/edge-agent, /etc/systemd/system/edge-agent.service,
/etc/edge-agent/agent.yaml (kept if present), the guides in /usr/local/share/doc/edge-agent,
the edge-agent system user and /var/lib/edge-agent; then enables and (re)starts the
service. Safe to run again.

Options:
  --prefix DIR       install directory (default: /opt/edge-agent)
  --root DIR         install into DIR as if it were / (images, tests): no user is
                     created, nothing is started; the service is enabled with
                     systemctl --root
  --python PATH      python3 for the venv (default: /usr/bin/python3)
  --unit FILE        systemd unit to ship (default: systemd/edge-agent.service)
  --wheel FILE       install this edge-agent wheel (default: build one from this checkout)
  --jetson           venv with --system-site-packages, JetPack's onnxruntime-gpu/TensorRT
  --extras LIST      pip extras to add, comma-separated (default: litert; "" for none)
  --no-deps          install only the agent (its dependencies come from elsewhere)
  --wheelhouse DIR   install dependencies offline from this folder
  --no-start         enable the service but do not start it
  --uninstall        remove the venv, unit, guides and symlink; keep config and state
  --purge            with --uninstall: also delete /etc/edge-agent and /var/lib/edge-agent
  -h, --help         this text

Example:
  sudo packaging/install.sh --jetson
USAGE
}

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=lib/common.sh
EA_LIB_DIR=$HERE/lib
. "$HERE/lib/common.sh"

PREFIX=/opt/edge-agent
ROOT=/
PYTHON=/usr/bin/python3
WHEEL=""
JETSON=${EDGE_AGENT_JETSON:-0}
NO_DEPS=0
# LiteRT is the Raspberry Pi backend; its wheel exists for aarch64 and x86-64 Linux.
EXTRAS=litert
WHEELHOUSE=""
START=1
UNINSTALL=0
PURGE=0
BUILD_PYTHON=${BUILD_PYTHON:-python3}
UNIT_SRC=$REPO/systemd/edge-agent.service

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
        --unit) UNIT_SRC=${2:?--unit needs a file}; shift 2 ;;
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --jetson) JETSON=1; shift ;;
        --extras) EXTRAS=${2?--extras needs a list}; shift 2 ;;
        --no-deps) NO_DEPS=1; shift ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
        --no-start) START=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; ea_die "unknown option $1 (packaging/install.sh)" ;;
    esac
done

case "$PREFIX" in /*) ;; *) ea_die "--prefix must be absolute ($PREFIX)" ;; esac
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || ea_die "--purge goes with --uninstall"
if [ "$ROOT" != / ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi
# R: where files go now; every path written into a file is the final one (no $R in it).
R=${ROOT%/}
UNIT=/etc/systemd/system/$EA_SERVICE
STATE_DIR=/var/lib/edge-agent
CONFIG=/etc/edge-agent/agent.yaml
LINK=/usr/local/bin/edge-agent
# FHS: documentation of software installed outside the package manager
DOC_DIR=/usr/local/share/doc/edge-agent

if [ "$ROOT" = / ] && [ "$(id -u)" != 0 ]; then
    ea_die "run as root (sudo), or use --root DIR to install into a folder"
fi

disable_service() {
    if ea_systemd_running "$ROOT"; then
        systemctl disable --now "$EA_SERVICE" >/dev/null 2>&1 || true
    elif command -v systemctl >/dev/null; then
        systemctl --root="$ROOT" disable "$EA_SERVICE" >/dev/null 2>&1 || true
    fi
    rm -f "$R/etc/systemd/system/multi-user.target.wants/$EA_SERVICE"
}

if [ "$UNINSTALL" = 1 ]; then
    disable_service
    rm -f "$R$UNIT" "$R$LINK"
    rm -rf "$R$PREFIX" "$R$DOC_DIR"
    ea_systemd_running "$ROOT" && systemctl daemon-reload || true
    if [ "$PURGE" = 1 ]; then
        rm -rf "$R$STATE_DIR" "$R/etc/edge-agent"
        ea_log "edge-agent purged (the edge-agent user is kept)"
    else
        ea_log "edge-agent removed; kept $CONFIG and $STATE_DIR (--purge deletes them)"
    fi
    exit 0
fi

[ -f "$UNIT_SRC" ] || ea_die "$UNIT_SRC: the systemd unit is missing"
[ -x "$PYTHON" ] || ea_die "$PYTHON: no python3 there (use --python)"
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || ea_die "$WHEEL: wheel not found"

WORK=$(mktemp -d)
# shellcheck disable=SC2064  # expand now: the path is fixed
trap "rm -rf '$WORK'" EXIT
[ -n "$WHEEL" ] || WHEEL=$(ea_build_wheel "$REPO" "$WORK/wheel" "$BUILD_PYTHON")

# A venv made by another python (an OS upgrade from 3.11 to 3.12) is rebuilt, not patched.
VENV=$R$PREFIX/venv
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    ea_log "the existing venv's python is gone; rebuilding $VENV"
    rm -rf "$VENV"
fi
set --
[ -n "$WHEELHOUSE" ] && set -- --no-index --find-links "$WHEELHOUSE"
ea_make_venv "$VENV" "$PREFIX/venv" "$PYTHON" "$WHEEL" "$JETSON" "$NO_DEPS" "$EXTRAS" "$@"

install -d "$R/usr/local/bin"
ln -sfn "$PREFIX/venv/bin/edge-agent" "$R$LINK"

install -d "$R/etc/systemd/system"
# The unit runs /usr/bin/edge-agent (the .deb's symlink); here the venv's script is named
# directly, so the unit works whatever --prefix is and whatever is in /usr/bin. Its
# Documentation= names the .deb's doc folder; here the guides are in /usr/local.
sed -e "s#/usr/bin/edge-agent#$PREFIX/venv/bin/edge-agent#g" \
    -e "s#/usr/share/doc/edge-agent/#$DOC_DIR/#g" "$UNIT_SRC" > "$WORK/unit"
install -m 0644 "$WORK/unit" "$R$UNIT"
# replaced as a whole, so a guide dropped from docs/ does not linger from an older install
rm -rf "$R$DOC_DIR"
ea_install_docs "$REPO" "$R$DOC_DIR"

if [ ! -f "$R$CONFIG" ]; then
    install -d -m 0755 "$R/etc/edge-agent"
    "$VENV/bin/python" -m agent.cli config init --out "$R$CONFIG" >/dev/null 2>&1 \
        || "$BUILD_PYTHON" -m agent.cli config init --out "$R$CONFIG" >/dev/null \
        || ea_die "cannot write $R$CONFIG"
else
    ea_log "kept the existing $R$CONFIG"
fi

if [ "$ROOT" = / ]; then
    if ! getent passwd "$EA_USER" >/dev/null; then
        if command -v adduser >/dev/null && adduser --help 2>&1 | grep -q -- --system; then
            adduser --system --group --quiet --home "$STATE_DIR" --no-create-home "$EA_USER"
        else
            useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
                --shell /usr/sbin/nologin "$EA_USER"
        fi
    fi
    for group in $EA_GROUPS; do
        getent group "$group" >/dev/null && usermod -a -G "$group" "$EA_USER"
    done
    install -d -o "$EA_USER" -g "$EA_USER" -m 0750 "$STATE_DIR"
    chown "$EA_USER:$EA_USER" "$STATE_DIR"
    chmod 0750 "$STATE_DIR"
    chown "root:$EA_USER" "$CONFIG"
    chmod 0640 "$CONFIG"
else
    # No user database to edit in a folder; the unit's StateDirectory= or first boot of
    # the image creates what is missing (see docs/install.md).
    install -d -m 0750 "$R$STATE_DIR"
    ea_log "--root: skipped creating the $EA_USER user and chown of $STATE_DIR"
fi

if ea_systemd_running "$ROOT"; then
    systemctl daemon-reload
    systemctl enable "$EA_SERVICE" >/dev/null
    if [ "$START" = 1 ]; then
        systemctl restart "$EA_SERVICE"
        ea_log "edge-agent installed and (re)started: systemctl status $EA_SERVICE"
    else
        ea_log "edge-agent installed and enabled (not started)"
    fi
else
    # systemctl --root only creates the [Install] symlinks; it needs no running systemd.
    if ! { command -v systemctl >/dev/null && systemctl --root="$ROOT" enable "$EA_SERVICE" >/dev/null 2>&1; }; then
        install -d "$R/etc/systemd/system/multi-user.target.wants"
        ln -sfn "$UNIT" "$R/etc/systemd/system/multi-user.target.wants/$EA_SERVICE"
    fi
    ea_log "edge-agent installed into $ROOT and enabled; systemd is not running here, nothing started"
fi
