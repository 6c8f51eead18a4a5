"""The tests' forked `python -m fewzero.train` processes (tests/cli_processes.py) behave as the
command does: its arguments, working directory, environment, output, session and exit status."""

import os
import signal
import sys

import cli_processes
import pytest
from conftest import tone_overrides


def test_a_forked_command_gets_its_arguments_directory_environment_and_exit_status(tmp_path):
    command = [sys.executable, "-m", "fewzero.train", "experiment=nope", "hydra.run.dir=run"]
    quiet = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    for env, traceback in [(quiet, False), ({**quiet, "HYDRA_FULL_ERROR": "1"}, True)]:
        done = cli_processes.run(command, capture_output=True, text=True, timeout=300,
                                 cwd=tmp_path, env=env)
        assert done.returncode == 1
        assert "Could not find 'experiment/nope'" in done.stderr
        assert ("Traceback" in done.stderr) == traceback  # the environment it was given
    # refused after Hydra made its run directory: "run" is relative to the directory it was given
    refused = cli_processes.run([*command[:3], f"ckpt_path={tmp_path / 'none.ckpt'}", "hydra.run.dir=run"],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 1 and "none.ckpt does not exist" in refused.stdout + refused.stderr
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()
    help_text = cli_processes.run([sys.executable, "-m", "fewzero.train", "--help"],
                                  capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "== Config ==" in help_text.stdout


def test_a_forked_run_is_a_process_of_its_own_session_that_a_signal_ends(tmp_path):
    command = [sys.executable, "-m", "fewzero.train", *tone_overrides(tmp_path),
               "trainer.max_steps=100000", f"hydra.run.dir={tmp_path / 'run'}"]
    with (tmp_path / "log").open("w") as log:
        run = cli_processes.start(command, stdout=log, stderr=log, start_new_session=True)
    try:
        assert isinstance(run, cli_processes.ForkedProcess) and run.pid != os.getpid()
        assert run.poll() is None  # preparing its data, far from its 100000 steps
        assert os.getsid(run.pid) == run.pid
    finally:
        run.kill()
    assert run.wait(timeout=60) == -signal.SIGKILL
    other = cli_processes.start([sys.executable, "-c", "pass"])  # not a preloaded module
    assert not isinstance(other, cli_processes.ForkedProcess) and other.wait(timeout=60) == 0


def test_a_forked_script_runs_as_main_with_its_folder_first_on_the_path(tmp_path):
    script = tmp_path / "tool" / "report_self.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint(__name__, sys.argv, sys.path[0] == __import__('os').path.dirname("
                      "__file__))\nimport fewzero.train\nraise SystemExit(3)\n")
    with (tmp_path / "log").open("w") as log:
        run = cli_processes.start([sys.executable, str(script), "a b", "c"], stdout=log, stderr=log)
    assert isinstance(run, cli_processes.ForkedProcess) and run.wait(timeout=60) == 3
    assert (tmp_path / "log").read_text() == f"__main__ {[str(script), 'a b', 'c']} True\n"
    # this interpreter as a printed command names it, relative to the command's directory
    relative = os.path.relpath(sys.executable, tmp_path)
    with (tmp_path / "log").open("w") as log:
        run = cli_processes.start([relative, str(script), "d"], stdout=log, stderr=log, cwd=tmp_path)
    assert isinstance(run, cli_processes.ForkedProcess) and run.wait(timeout=60) == 3
    assert (tmp_path / "log").read_text() == f"__main__ {[str(script), 'd']} True\n"
    with pytest.raises(FileNotFoundError):  # a path from another directory: not this interpreter
        cli_processes.start([relative, str(script)], cwd=tmp_path / "tool")
