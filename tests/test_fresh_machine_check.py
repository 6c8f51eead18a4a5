"""scripts/fresh_machine_check.sh's arguments. The check itself needs root, debootstrap and the
distributions' archives, so it is run by hand (docs/benchmarks.md, "Set-up on fresh machines")."""

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
