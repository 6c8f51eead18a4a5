#!/usr/bin/env bash
# One-time (and idempotent) set-up: system packages for rendering, then the project's
# virtualenv in .venv with `pip install -e .[dev]`. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# FluidSynth + SoundFonts (rendered SOL); instrument drawings and an SVG renderer (image ZSL)
APT_PACKAGES=(fluidsynth musescore-general-soundfont fluid-soundfont-gm
              openclipart-svg tuxpaint-stamps-default librsvg2-bin)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# ---- 1. system packages: FluidSynth, the two General-MIDI SoundFonts, image side info -----
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
fi
"$PYTHON" -m venv --help >/dev/null 2>&1 && "$PYTHON" -c "import ensurepip" 2>/dev/null \
    || missing+=(python3-venv)
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
        if [[ $(id -u) -eq 0 || -n "$SUDO" ]]; then
            say "installing Debian packages: ${missing[*]}"
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            say "WARNING: cannot install ${missing[*]} (not root, no passwordless sudo)."
            say "  Ask an administrator for: apt-get install ${missing[*]}"
            say "  Without them the default dataset (rendered SOL) cannot be rendered; tests that"
            say "  need a SoundFont are skipped. Real TinySOL (dataset=tinysol) still works."
            say "  Without the image packages experiment=zsl_image_audio needs side_info.root=<images>."
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
[[ -x .venv/bin/python ]] || { say "creating .venv"; "$PYTHON" -m venv .venv; }
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
