#!/usr/bin/env bash
# One-time (and idempotent) set-up: system packages for rendering, then the project's
# virtualenv in .venv with `pip install -e .[dev]`. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# FluidSynth + SoundFonts (rendered SOL); instrument drawings and an SVG renderer (image ZSL)
APT_PACKAGES=(fluidsynth musescore-general-soundfont fluid-soundfont-gm
              openclipart-svg tuxpaint-stamps-default librsvg2-bin)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# The interpreter: $PYTHON, else python3.11 (what the project is tested with), else the first of
# python3, python3.12, python3.13 that is 3.11 or newer (Ubuntu 22.04's python3 is 3.10 even where
# python3.11 is installed beside it).
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in python3.11 python3 python3.12 python3.13; do
        if command -v "$candidate" >/dev/null 2>&1 \
                && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
    PYTHON="${PYTHON:-python3}"   # none is new enough: the version check below says so
fi
# Debian and Ubuntu ship venv/ensurepip apart from the interpreter, as python3.X-venv
VENV_PACKAGE="python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \
                      || echo 3)-venv"

# What each system package is for, said when it cannot be installed
what_needs() {
    case "$1" in
        fluidsynth|musescore-general-soundfont|fluid-soundfont-gm)
            echo "the default dataset (rendered SOL) cannot be rendered and the tests that need it are skipped; real TinySOL (dataset=tinysol) still works" ;;
        openclipart-svg|tuxpaint-stamps-default|librsvg2-bin)
            echo "experiment=zsl_image_audio needs side_info.root=<a folder of instrument images>; everything else works" ;;
        *-venv) echo "the project's virtualenv cannot be created" ;;
    esac
}
apt_install() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null; }
# Whether $PYTHON can make a virtualenv with pip in it (Debian's python3.X-venv gives ensurepip)
can_make_venv() { "$PYTHON" -m venv --help >/dev/null 2>&1 && "$PYTHON" -c "import ensurepip" 2>/dev/null; }

# ---- 1. system packages: FluidSynth, the two General-MIDI SoundFonts, image side info -----
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
fi
can_make_venv || missing+=("$VENV_PACKAGE")
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        # sudo only where it needs no password (`sudo -n true` says so without asking for one)
        if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        fi
        if [[ $(id -u) -eq 0 || -n "$SUDO" ]]; then
            say "installing Debian packages: ${missing[*]}"
            $SUDO apt-get update -qq || say "WARNING: apt-get update failed; installing from the package lists as they are"
            if ! apt_install "${missing[@]}"; then
                # apt installs all or nothing: a package this distribution lacks (or a disabled
                # component, such as Ubuntu's universe) must not keep the others out
                failed=()
                for pkg in "${missing[@]}"; do
                    if ! reason=$(apt_install "$pkg" 2>&1); then
                        failed+=("$pkg")
                        say "WARNING: could not install the Debian package $pkg ($(tail -n 1 <<<"$reason")):"
                        say "  $(what_needs "$pkg")."
                    fi
                done
                if ((${#failed[@]})); then
                    say "  To install them later: apt-get install ${failed[*]} (on Ubuntu, enable the"
                    say "  universe component first: add-apt-repository universe), then run this again."
                fi
            fi
        else
            say "WARNING: cannot install ${missing[*]} (not root, no passwordless sudo)."
            say "  Ask an administrator for: apt-get install ${missing[*]}"
            for pkg in "${missing[@]}"; do say "  Without $pkg, $(what_needs "$pkg")."; done
        fi
    else
        say "WARNING: no apt-get here (macOS or another distribution). Install by hand:"
        say "  macOS: brew install fluid-synth, then download MuseScore_General.sf3 and"
        say "  FluidR3_GM.sf2 and pass dataset.source.soundfonts=[/path/a.sf3,/path/b.sf2]"
    fi
fi

# ---- 2. Python: .venv with the project and its pinned dependencies ----------------------
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    say "ERROR: Python >= 3.11 is required ($("$PYTHON" --version 2>&1) found). Set PYTHON=python3.11."
    exit 1
}
# A .venv made while ensurepip was missing has a python but no pip, and would stay broken
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    say ".venv has no pip (made before $VENV_PACKAGE was installed?): making it again"
    rebuild_venv=1
fi
if [[ ! -x .venv/bin/python || -n "${rebuild_venv:-}" ]]; then
    can_make_venv || {   # again: step 1 may have installed it
        say "ERROR: $PYTHON cannot make a virtualenv: it lacks ensurepip, which Debian and Ubuntu"
        say "  ship as the package $VENV_PACKAGE. Install it (apt-get install $VENV_PACKAGE, as root"
        say "  or by an administrator), then run this again."
        if [[ " ${failed[*]:-} " == *" $VENV_PACKAGE "* ]]; then
            say "  apt could not install it here (above): on Ubuntu, enable the universe component first."
        fi
        exit 1
    }
    say "creating .venv"
    "$PYTHON" -m venv --clear .venv
fi
stamp=".venv/.fewzero-installed"
want="$(sha1sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    # The CUDA builds of torch/torchvision/torchaudio are most of it: .venv ends at about 6.1 GB
    # and the install peaked at 8.0 GB more disk than before it (measured on Debian 12).
    need_mb=6500; want_mb=9000
    for dir in . "${TMPDIR:-/tmp}"; do
        free_mb=$(df -Pm "$dir" | awk 'NR==2 {print $4}')
        if ((free_mb < need_mb)); then
            say "ERROR: only ${free_mb} MB free on the disk holding $(cd "$dir" && pwd);"
            say "  installing the torch CUDA stack into .venv needs about ${want_mb} MB while it runs"
            say "  and 6.1 GB after. Free some space (or point TMPDIR at a larger disk) and run again."
            exit 1
        elif ((free_mb < want_mb)); then
            say "WARNING: ${free_mb} MB free on the disk holding $(cd "$dir" && pwd); the install"
            say "  peaks at about ${want_mb} MB and may fail with 'No space left on device'."
        fi
    done
    say "installing fewzero and its dependencies into .venv (first time: a few minutes)"
    .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
    .venv/bin/python -m pip install -q --no-cache-dir -e '.[dev]'
    echo "$want" > "$stamp"
fi
say "ready: .venv/bin/python -m fewzero.train   |   .venv/bin/python -m pytest"
