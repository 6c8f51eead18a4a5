#!/usr/bin/env bash
# Run the README's two commands on a fresh Debian or Ubuntu system, made here with debootstrap:
# a chroot of the distribution's minimal system, with the components a cloud image enables
# (Ubuntu: main restricted universe multiverse), a user like a cloud image's (passwordless sudo,
# or none with --no-sudo), and a clone of this repository's HEAD. Nothing of this machine's own
# Python, pip settings or caches reaches it. For developers; needs root, debootstrap and the
# distribution's archive over the network.
#
#   sudo bash scripts/fresh_machine_check.sh jammy          # Ubuntu 22.04, apt install python3.11
#   sudo bash scripts/fresh_machine_check.sh noble          # Ubuntu 24.04, its python3 (3.12)
#   sudo bash scripts/fresh_machine_check.sh bookworm       # Debian 12, its python3 (3.11)
#   sudo bash scripts/fresh_machine_check.sh noble --no-sudo   # the user has no sudo: setup.sh
#       names the packages; root installs them (as an administrator would); then as above
#   ... --zero-shot    # also every zero-shot experiment for a few steps (debug=fast)
#
# Logs: <root>/log/{main,tests,zero_shot}.log; the root (default /srv/fewzero-<suite>) is kept
# for inspection, and made afresh on the next run (--keep reuses it). Every step runs even when
# one before it failed; the exit status is 1 when any failed (the last line names them), else 0.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit "${1:-0}"; }
[[ $# -ge 1 ]] || usage 2
[[ $1 == -h || $1 == --help ]] && usage
SUITE=$1; shift
SUDO_USER_KIND=sudo; ZERO_SHOT=0; KEEP=0
for arg in "$@"; do
    case "$arg" in
        --no-sudo) SUDO_USER_KIND=none ;;
        --zero-shot) ZERO_SHOT=1 ;;
        --keep) KEEP=1 ;;
        -h|--help) usage ;;
        *) echo "unknown option $arg" >&2; usage 2 ;;
    esac
done
case "$SUITE" in
    jammy) MIRROR=http://archive.ubuntu.com/ubuntu; PYTHON_PACKAGES="python3 python3.11"; USER_NAME=ubuntu ;;
    noble) MIRROR=http://archive.ubuntu.com/ubuntu; PYTHON_PACKAGES=python3; USER_NAME=ubuntu ;;
    bookworm) MIRROR=http://deb.debian.org/debian; PYTHON_PACKAGES=python3; USER_NAME=debian ;;
    *) echo "suite must be jammy, noble or bookworm, not $SUITE" >&2; exit 2 ;;
esac
say() { printf '\033[1m[fresh %s]\033[0m %s\n' "$SUITE" "$*"; }

# A step: a command run as the user in a login shell (no environment from here), from a file (no
# quoting on the way), timed, its log kept; one that fails is remembered and the next one runs.
FAILED_STEPS=()
run_logged() {   # [--any-status] name command; --any-status: a failure is not the check's
    local record=1 name started status
    [[ $1 == --any-status ]] && { record=0; shift; }
    name=$1
    printf 'cd ~/fewzero\n%s\n' "$2" > "$ROOT/tmp/fresh_$name.sh"
    started=$(date +%s)
    set +e
    chroot "$ROOT" sudo -u "$USER_NAME" -H bash -l "/tmp/fresh_$name.sh" > "$ROOT/log/$name.log" 2>&1
    status=$?
    set -e
    say "$name: exit status $status after $(( $(date +%s) - started )) s; log: $ROOT/log/$name.log"
    ((status == 0 || record == 0)) || FAILED_STEPS+=("$name")
}
finish() {   # the last line, and the exit status: 1 when a step failed
    if ((${#FAILED_STEPS[@]})); then
        say "FAILED: ${FAILED_STEPS[*]} (logs in $ROOT/log)"
        exit 1
    fi
    say "every step exited 0"
}
# every zero-shot experiment of the clone for a few steps; fails when one of them fails
ZERO_SHOT_STEP='failed=0
for config in configs/experiment/zsl_*.yaml; do
    e=$(basename "$config" .yaml)
    if .venv/bin/python -m fewzero.train experiment=$e debug=fast "~callbacks.progress_bar" > /tmp/$e.log 2>&1
    then echo "$e: ran"; else echo "$e: FAILED"; tail -n 5 /tmp/$e.log; failed=1; fi
done
exit $failed'
# sourced (tests/test_fresh_machine_check.py): the functions above, nothing run
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

[[ $(id -u) -eq 0 ]] || { echo "needs root (debootstrap, chroot, mount)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "needs debootstrap: apt-get install debootstrap" >&2; exit 1; }
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${FRESH_ROOT:-/srv/fewzero-$SUITE}

# the host's folders the chroot needs, mounted in this order (/dev/shm: multiprocessing's semaphores)
MOUNTS=(proc sys dev dev/pts dev/shm)
unmount_all() {   # in the reverse order
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        mountpoint -q "$ROOT/${MOUNTS[i]}" 2>/dev/null && umount -l "$ROOT/${MOUNTS[i]}"
    done
    return 0
}
trap unmount_all EXIT

if [[ $KEEP -eq 0 || ! -x $ROOT/bin/bash ]]; then
    unmount_all
    if grep -q " $ROOT/" /proc/mounts; then
        echo "something is still mounted under $ROOT; not removing it" >&2; exit 1
    fi
    rm -rf --one-file-system "$ROOT"
    # the system, .venv (6.1 GB), the rendered data and what the tests leave in /tmp: 13-19 GB
    # a check on 2026-12-06
    mkdir -p "$(dirname "$ROOT")"
    free_mb=$(df -Pm "$(dirname "$ROOT")" | awk 'NR==2 {print $4}')
    if ((free_mb < 20000)); then
        echo "only $free_mb MB free where $ROOT goes; a check needs about 20 GB (FRESH_ROOT=... elsewhere)" >&2
        exit 1
    fi
    # Debian 12's debootstrap has no script for noble; Ubuntu's scripts are all the same one
    script_dir=/usr/share/debootstrap/scripts
    [[ -e $script_dir/$SUITE ]] || ln -s gutsy "$script_dir/$SUITE"
    # Ubuntu's archive key is not in Debian's keyring; apt inside checks it once installed
    check=(); [[ $SUITE == bookworm ]] || check=(--no-check-gpg)
    say "debootstrap $SUITE into $ROOT"
    debootstrap "${check[@]}" --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >/dev/null
fi
mkdir -p "$ROOT/log"

if [[ $SUITE == bookworm ]]; then
    cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
else
    cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main restricted universe multiverse
deb $MIRROR $SUITE-updates main restricted universe multiverse
deb http://security.ubuntu.com/ubuntu $SUITE-security main restricted universe multiverse
EOF
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
grep -q "$(hostname)" "$ROOT/etc/hosts" 2>/dev/null || echo "127.0.1.1 $(hostname)" >> "$ROOT/etc/hosts"
for dir in "${MOUNTS[@]}"; do
    mkdir -p "$ROOT/$dir"
    mountpoint -q "$ROOT/$dir" || mount --bind "/$dir" "$ROOT/$dir"
done
# This machine's extra certificate authorities (a network that inspects TLS needs them for pip)
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi

say "installing what a cloud image has: ca-certificates git sudo $PYTHON_PACKAGES"
chroot "$ROOT" /bin/bash -c "export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq ca-certificates git sudo $PYTHON_PACKAGES >/dev/null
    update-ca-certificates >/dev/null
    id $USER_NAME >/dev/null 2>&1 || useradd -m -s /bin/bash $USER_NAME
    rm -f /etc/sudoers.d/90-fresh
    if [[ $SUDO_USER_KIND == sudo ]]; then
        echo '$USER_NAME ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-fresh
        chmod 440 /etc/sudoers.d/90-fresh
    fi"

home=$ROOT/home/$USER_NAME
rm -rf "$home/fewzero"
git clone -q "$PROJECT" "$home/fewzero"
chroot "$ROOT" chown -R "$USER_NAME:" "/home/$USER_NAME/fewzero"
say "cloned $(git -C "$PROJECT" log --oneline -1)"

if [[ $SUDO_USER_KIND == none ]]; then
    run_logged --any-status setup_without_sudo "bash scripts/setup.sh"   # expected to stop
    grep -E "WARNING|ERROR|Ask an administrator" "$ROOT/log/setup_without_sudo.log" || true
    asked=$(sed -n 's/.*Ask an administrator for: apt-get install //p' "$ROOT/log/setup_without_sudo.log")
    [[ -n $asked ]] || { say "setup.sh without sudo did not say what to ask an administrator for"; exit 1; }
    say "as the administrator: apt-get install $asked"
    chroot "$ROOT" /bin/bash -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $asked >/dev/null"
fi
run_logged main "bash scripts/setup.sh && .venv/bin/python -m fewzero.train"
grep -E "5way_[15]shot │|best validation" "$ROOT/log/main.log" || true
run_logged tests "bash scripts/setup.sh && .venv/bin/python -m pytest"
grep -E "^=+ .*(passed|failed)" "$ROOT/log/tests.log" || true
if [[ $ZERO_SHOT -eq 1 ]]; then
    run_logged zero_shot "$ZERO_SHOT_STEP"
    grep -E ": (ran|FAILED)" "$ROOT/log/zero_shot.log" || true
fi
finish
