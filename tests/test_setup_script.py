"""scripts/setup.sh on a simulated fresh machine: apt-get, dpkg-query, id and the interpreters
are stand-ins on PATH that record what they are asked, so nothing is installed."""

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha1sum") is None,
                                reason="needs bash and coreutils")


def _write_tool(folder: Path, name: str, body: str) -> None:
    tool = folder / name
    tool.write_text("#!/usr/bin/env bash\n" + body)
    tool.chmod(0o755)


def _project(tmp_path: Path) -> Path:
    """A copy of the script in a project whose .venv is already installed, so that only the
    system-package step does anything."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, project / "scripts" / "setup.sh")
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (project / ".venv" / "bin").mkdir(parents=True)
    _write_tool(project / ".venv" / "bin", "python", "exit 0\n")
    digest = hashlib.sha1((project / "pyproject.toml").read_bytes()).hexdigest()
    (project / ".venv" / ".fewzero-installed").write_text(digest + "\n")
    return project


# what a stand-in python3.11 says when setup.sh asks its version for the venv package's name, so
# that the tests also hold where they run on another Python (Ubuntu 24.04's 3.12)
_ANSWERS_AS_3_11 = """[[ "$*" == *'print("%d.%d"'* ]] && { echo 3.11; exit 0; }"""


def _fake_machine(tmp_path: Path, unavailable: str, ensurepip: bool) -> tuple[Path, Path]:
    """Stand-ins for a root shell on Debian where no package is installed yet and apt-get
    cannot find `unavailable`. Returns (the folder to put first on PATH, apt-get's log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    _write_tool(bin_dir, "dpkg-query", "exit 1\n")
    _write_tool(bin_dir, "id", 'echo 0\n')
    _write_tool(bin_dir, "apt-get", f"""echo "$*" >> {log}
[[ "$1" == update ]] && exit 0
for arg in "$@"; do
    if [[ "$arg" == {unavailable} ]]; then echo "E: Unable to locate package $arg" >&2; exit 100; fi
done
exit 0
""")
    # python3.11 is this interpreter, whatever its version; `import ensurepip` answers as asked
    probe = "exit 0" if ensurepip else "exit 1"
    _write_tool(bin_dir, "python3.11", f"""{_ANSWERS_AS_3_11}
[[ "$*" == "-c import ensurepip" ]] && {probe}
exec {sys.executable} "$@"
""")
    return bin_dir, log


def _run(project: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    environment.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", **env)
    return subprocess.run(["bash", str(project / "scripts" / "setup.sh")], env=environment,
                          capture_output=True, text=True, timeout=120)


def test_a_package_the_distribution_lacks_does_not_keep_the_others_out(tmp_path):
    project = _project(tmp_path)
    bin_dir, log = _fake_machine(tmp_path, unavailable="openclipart-svg", ensurepip=True)

    result = _run(project, bin_dir, PYTHON=str(bin_dir / "python3.11"))

    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    # all at once first, then one by one: every other package still gets installed
    assert calls[1].startswith("install") and "fluidsynth" in calls[1] and "openclipart-svg" in calls[1]
    singles = [c.split()[-1] for c in calls[2:]]
    assert singles == ["fluidsynth", "musescore-general-soundfont", "fluid-soundfont-gm",
                       "openclipart-svg", "tuxpaint-stamps-default", "librsvg2-bin"]
    # the warning names the package, apt's reason and what is lost without it
    assert "could not install the Debian package openclipart-svg" in result.stdout
    assert "Unable to locate package openclipart-svg" in result.stdout
    assert "experiment=zsl_image_audio needs side_info.root" in result.stdout
    assert "could not install the Debian package fluidsynth" not in result.stdout
    assert "ready:" in result.stdout


def test_python311_is_found_beside_an_older_python3_and_gets_its_own_venv_package(tmp_path):
    project = _project(tmp_path)
    bin_dir, log = _fake_machine(tmp_path, unavailable="none", ensurepip=False)
    # Ubuntu 22.04: python3 is 3.10, python3.11 is installed beside it
    _write_tool(bin_dir, "python3", '[[ "$1" == --version ]] && echo "Python 3.10.12"\nexit 1\n')

    result = _run(project, bin_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    install = [c for c in log.read_text().splitlines() if c.startswith("install")]
    assert len(install) == 1 and install[0].split()[-1] == "python3.11-venv"
    assert "ready:" in result.stdout


def test_no_python_new_enough_says_which_was_found(tmp_path):
    project = _project(tmp_path)
    bin_dir, _ = _fake_machine(tmp_path, unavailable="none", ensurepip=True)
    _write_tool(bin_dir, "python3", '[[ "$1" == --version ]] && echo "Python 3.10.12"\nexit 1\n')
    for name in ("python3.11", "python3.12", "python3.13"):  # hide those the real machine has
        _write_tool(bin_dir, name, "exit 1\n")

    result = _run(project, bin_dir)

    assert result.returncode == 1
    assert "Python >= 3.11 is required (Python 3.10.12 found)" in result.stdout


def test_without_root_or_sudo_it_names_each_missing_package_and_what_goes_without_it(tmp_path):
    project = _project(tmp_path)
    bin_dir, log = _fake_machine(tmp_path, unavailable="none", ensurepip=True)
    _write_tool(bin_dir, "id", "echo 1000\n")
    _write_tool(bin_dir, "sudo", "exit 1\n")  # sudo -n: a password would be needed

    result = _run(project, bin_dir, PYTHON=str(bin_dir / "python3.11"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert not log.exists()  # apt-get was never run
    assert "Ask an administrator for: apt-get install fluidsynth musescore-general-soundfont" in result.stdout
    assert ("Without fluid-soundfont-gm, the default dataset (rendered SOL) cannot be rendered"
            in result.stdout)
    assert "Without librsvg2-bin, experiment=zsl_image_audio needs side_info.root" in result.stdout


def test_python311_is_preferred_to_a_newer_python3(tmp_path):
    project = _project(tmp_path)
    bin_dir, log = _fake_machine(tmp_path, unavailable="none", ensurepip=False)
    # Ubuntu 24.04 with python3.11 added: python3 is 3.12, new enough but not what is tested
    _write_tool(bin_dir, "python3", 'case "$*" in *"print("*) echo 3.12;; *ensurepip*) exit 1;; '
                                    '*) exit 0;; esac\n')

    result = _run(project, bin_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    install = [c for c in log.read_text().splitlines() if c.startswith("install")]
    assert len(install) == 1 and install[0].split()[-1] == "python3.11-venv"


def test_without_ensurepip_it_stops_before_making_a_venv_that_has_no_pip(tmp_path):
    project = _project(tmp_path)
    shutil.rmtree(project / ".venv")
    bin_dir, _ = _fake_machine(tmp_path, unavailable="none", ensurepip=False)
    _write_tool(bin_dir, "id", "echo 1000\n")
    _write_tool(bin_dir, "sudo", "exit 1\n")

    result = _run(project, bin_dir, PYTHON=str(bin_dir / "python3.11"))

    assert result.returncode == 1
    assert "lacks ensurepip, which Debian and Ubuntu" in result.stdout
    assert "apt-get install python3.11-venv" in result.stdout
    assert not (project / ".venv").exists()  # a re-run after the install starts clean


def test_a_venv_without_pip_is_made_again_and_installed_into(tmp_path):
    project = _project(tmp_path)
    # what `python3 -m venv` leaves where ensurepip was missing: a python, no pip
    _write_tool(project / ".venv" / "bin", "python", "exit 1\n")
    bin_dir, _ = _fake_machine(tmp_path, unavailable="none", ensurepip=True)
    calls = tmp_path / "python.log"
    healthy_python = f'echo "venv-python $*" >> {calls}\nexit 0\n'
    _write_tool(bin_dir, "python3.11", f"""{_ANSWERS_AS_3_11}
case "$*" in
    "-m venv --clear .venv")
        echo "python3.11 $*" >> {calls}
        rm -rf .venv && mkdir -p .venv/bin
        printf '%s\\n' '#!/usr/bin/env bash' {shlex.quote(healthy_python)} > .venv/bin/python
        chmod +x .venv/bin/python ;;
    *) exec {sys.executable} "$@" ;;
esac
""")

    result = _run(project, bin_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    assert ".venv has no pip" in result.stdout
    log = calls.read_text().splitlines()
    assert log[0] == "python3.11 -m venv --clear .venv"
    assert "venv-python -m pip install -q --no-cache-dir -e .[dev]" in log
    digest = hashlib.sha1((project / "pyproject.toml").read_bytes()).hexdigest()
    assert (project / ".venv" / ".fewzero-installed").read_text().strip() == digest


def test_a_venv_package_apt_cannot_find_ends_with_where_to_get_it(tmp_path):
    project = _project(tmp_path)
    shutil.rmtree(project / ".venv")
    # Ubuntu 24.04 with only `main` enabled: apt has no python3.11-venv to give
    bin_dir, _ = _fake_machine(tmp_path, unavailable="python3.11-venv", ensurepip=False)

    result = _run(project, bin_dir, PYTHON=str(bin_dir / "python3.11"))

    assert result.returncode == 1
    last_lines = result.stdout.strip().splitlines()[-4:]
    assert "lacks ensurepip" in last_lines[0]
    assert "enable the universe component first" in last_lines[-1]
    assert not (project / ".venv").exists()
