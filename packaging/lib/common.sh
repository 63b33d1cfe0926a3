# Shared shell functions for packaging/deb/build.sh and packaging/install.sh (POSIX sh).
# Sourced, not run. Every function prints what it does on stderr and fails loudly.

EA_SERVICE=edge-agent.service
# the folder of this file; the sourcing script sets it (sh has no BASH_SOURCE)
EA_LIB_DIR=${EA_LIB_DIR:?set EA_LIB_DIR before sourcing common.sh}
EA_USER=edge-agent
# Groups the service user joins when the board has them: cameras (video), Jetson/Pi GPU
# and codec nodes (render), and GPIO/I2C for boards that drive hardware.
EA_GROUPS="video render gpio i2c"
# The unit's Documentation= names daemon.md in the installed doc folder.
EA_DOC_ENTRY=daemon.md

ea_log() { printf '%s\n' "$*" >&2; }
ea_die() { printf 'Error: %s\n' "$*" >&2; exit 2; }

# ea_project_version REPO_ROOT -> the version from pyproject.toml
ea_project_version() {
    sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$1/pyproject.toml" | head -n 1
}

# ea_build_wheel REPO_ROOT OUT_DIR BUILD_PYTHON -> prints the wheel path.
# The source is copied first so the build never writes build/ or *.egg-info into the
# checkout (other people may be working in it).
ea_build_wheel() {
    _src=$(mktemp -d)
    (cd "$1" && tar cf - pyproject.toml README.md agent) | (cd "$_src" && tar xf -)
    find "$_src" -name __pycache__ -type d -prune -exec rm -rf {} +
    mkdir -p "$2"
    ea_log "building the wheel from $1"
    "$3" -m pip wheel --quiet --no-deps --wheel-dir "$2" "$_src" >&2 \
        || ea_die "wheel build failed ($1)"
    rm -rf "$_src"
    ls -t "$2"/edge_agent-*.whl | head -n 1
}

# ea_make_venv VENV_DIR FINAL_DIR PYTHON WHEEL SYSTEM_SITE NO_DEPS EXTRAS [PIP_ARGS...]
# Creates a venv at VENV_DIR that will work once moved to FINAL_DIR (shebangs, activate
# scripts and pyvenv.cfg rewritten; .pyc compiled with the final paths).
ea_make_venv() {
    _venv=$1 _final=$2 _python=$3 _wheel=$4 _system_site=$5 _no_deps=$6 _extras=$7
    shift 7
    # pip takes extras on a file requirement as "file.whl[a,b]"
    _wheel_req=$_wheel
    [ -n "$_extras" ] && _wheel_req="${_wheel}[$_extras]"
    _venv_args=""
    [ "$_system_site" = 1 ] && _venv_args="--system-site-packages"
    if [ ! -x "$_venv/bin/python" ]; then
        ea_log "creating venv $_venv (python: $_python${_venv_args:+, $_venv_args})"
        # shellcheck disable=SC2086  # _venv_args is empty or one word
        "$_python" -m venv $_venv_args "$_venv" || ea_die "cannot create a venv with $_python"
    fi
    if [ "$_no_deps" = 1 ]; then
        "$_venv/bin/python" -m pip install --quiet --no-compile --no-deps --force-reinstall \
            "$@" "$_wheel" >&2 || ea_die "pip install failed ($_wheel)"
    elif [ "$_system_site" = 1 ]; then
        # JetPack ships onnxruntime-gpu and TensorRT system-wide; a pip copy of either
        # (or the CPU onnxruntime wheel) in the venv would shadow it, so every other
        # dependency is installed and these are left to the system.
        _reqs=$("$_venv/bin/python" "$EA_LIB_DIR/wheel_requirements.py" "$_wheel" \
            --extras "$_extras" --exclude onnxruntime --exclude onnxruntime-gpu \
            --exclude tensorrt) || ea_die "cannot read $_wheel"
        # shellcheck disable=SC2086  # one requirement per word, none contain spaces
        "$_venv/bin/python" -m pip install --quiet --no-compile "$@" $_reqs >&2 \
            || ea_die "pip install of the dependencies failed"
        "$_venv/bin/python" -m pip install --quiet --no-compile --no-deps --force-reinstall \
            "$@" "$_wheel" >&2 || ea_die "pip install failed ($_wheel)"
    else
        "$_venv/bin/python" -m pip install --quiet --no-compile "$@" "$_wheel_req" >&2 \
            || ea_die "pip install failed ($_wheel_req)"
    fi
    ea_relocate_venv "$_venv" "$_final"
}

# ea_relocate_venv VENV_DIR FINAL_DIR: make a venv built at VENV_DIR run from FINAL_DIR.
ea_relocate_venv() {
    [ "$1" = "$2" ] && { ea_compile_venv "$1" "$2"; return 0; }
    for _f in "$1"/bin/* "$1/pyvenv.cfg"; do
        [ -f "$_f" ] && [ ! -L "$_f" ] || continue
        if grep -qI -F "$1" "$_f" 2>/dev/null; then
            sed -i "s#$1#$2#g" "$_f"
        fi
    done
    ea_compile_venv "$1" "$2"
}

# .pyc files are compiled now, with the final paths in them, so the service user (who
# cannot write under /opt) never tries to write them and dpkg owns every file.
ea_compile_venv() {
    find "$1" -name __pycache__ -type d -prune -exec rm -rf {} +
    "$1/bin/python" -m compileall -q -j 0 -s "$1" -p "$2" "$1/lib" >/dev/null \
        || ea_log "warning: some .pyc files were not compiled"
}

# ea_systemd_running ROOT: true when ROOT is / and systemd is PID 1 (not in a chroot or
# a container without systemd), the same test the dh_installsystemd snippets use.
ea_systemd_running() {
    [ "$1" = / ] && [ -d /run/systemd/system ]
}

# ea_install_docs REPO_ROOT DEST: the user guides (docs/*.md but the internal CONTRACTS.md,
# README.md, docs/examples/) as plain files, 0644. They stay uncompressed: the unit's
# Documentation= link and the guides' links to each other name the .md files.
ea_install_docs() {
    install -d -m 0755 "$2" "$2/examples"
    install -m 0644 "$1/README.md" "$2/README.md"
    for _doc in "$1"/docs/*.md; do
        [ "$(basename "$_doc")" = CONTRACTS.md ] && continue
        install -m 0644 "$_doc" "$2/"
    done
    for _example in "$1"/docs/examples/*; do
        [ -f "$_example" ] && install -m 0644 "$_example" "$2/examples/"
    done
    [ -f "$2/$EA_DOC_ENTRY" ] || ea_die "$1/docs/$EA_DOC_ENTRY missing: the unit's Documentation= names it"
}
