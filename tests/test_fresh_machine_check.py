"""scripts/fresh_machine_check.sh's arguments. The check itself needs root, debootstrap and the
distributions' archives, so it is run by hand (docs/benchmarks.md, "Set-up on fresh machines")."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fresh_machine_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_help_lists_the_three_systems_and_the_options():
    result = _run("--help")
    assert result.returncode == 0
    for word in ("jammy", "noble", "bookworm", "--no-sudo", "--zero-shot", "--keep"):
        assert word in result.stdout
    assert "set -euo" not in result.stdout  # the header only, not the code after it


@pytest.mark.parametrize("args, message", [
    (("trixie",), "suite must be jammy, noble or bookworm, not trixie"),
    (("noble", "--fast"), "unknown option --fast"),
    ((), "Run the README's two commands"),
])
def test_a_wrong_call_says_what_is_wrong_and_does_nothing(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr


def _steps(tmp_path: Path, steps: str) -> subprocess.CompletedProcess:
    """The script's step runner, sourced, with `chroot ROOT sudo ... bash -l FILE` standing in as
    `bash ROOT/FILE` in a home of tmp_path holding the clone's folder (no root, no system)."""
    root = tmp_path / "root"
    for folder in ("tmp", "log", "home/user/fewzero"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    driver = f"""
source {SCRIPT} noble
ROOT={root}
chroot() {{ local root=$1; HOME=$root/home/user bash "$root${{@: -1}}"; }}
{steps}
"""
    # FRESH_ROOT: were the script ever to run past its sourcing guard, it would stay in tmp_path
    env = {**os.environ, "FRESH_ROOT": str(tmp_path / "guard")}
    return subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=60, env=env)


def test_a_failed_step_does_not_stop_the_next_one_and_the_check_exits_1_naming_it(tmp_path):
    result = _steps(tmp_path, """
run_logged --any-status setup_without_sudo 'exit 1'
run_logged main 'echo trained'
run_logged tests 'echo 2 failed; exit 3'
run_logged zero_shot 'touch ran_after_the_failure'
finish
echo not reached""")
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "main: exit status 0" in out and "tests: exit status 3" in out
    assert "FAILED: tests (logs in" in out.splitlines()[-1]  # not the step expected to stop
    assert "not reached" not in out
    assert (tmp_path / "root/home/user/fewzero/ran_after_the_failure").is_file()
    assert (tmp_path / "root/log/tests.log").read_text() == "2 failed\n"


def test_a_check_whose_steps_all_pass_exits_0(tmp_path):
    result = _steps(tmp_path, "run_logged main 'true'\nrun_logged tests 'true'\nfinish")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].endswith("every step exited 0")


def test_the_zero_shot_step_runs_every_zsl_experiment_and_fails_when_one_fails(tmp_path):
    clone = tmp_path / "root/home/user/fewzero"
    (clone / "configs/experiment").mkdir(parents=True)
    for name in ("zsl_a", "zsl_b", "fsl_c"):
        (clone / "configs/experiment" / f"{name}.yaml").write_text("")
    python = clone / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/bash\necho "$@" >> ~/fewzero/calls\n[[ $3 != experiment=zsl_b ]]\n')
    python.chmod(0o755)
    result = _steps(tmp_path, 'run_logged zero_shot "$ZERO_SHOT_STEP"\nfinish')
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: zero_shot" in result.stdout
    calls = (clone / "calls").read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["experiment=zsl_a", "experiment=zsl_b"]
    assert all("debug=fast" in c for c in calls)
    log = (tmp_path / "root/log/zero_shot.log").read_text()
    assert "zsl_a: ran" in log and "zsl_b: FAILED" in log
