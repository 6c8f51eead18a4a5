"""`python -m fewzero.train` (or `fewzero.eval`) processes for the tests, forked from a server
that has imported them already.

Each command a test starts as a new process spends 11-14 s of CPU importing before it does
anything (`pytorch_lightning` imports `torchmetrics`, which imports `torchvision`,
`transformers` and `scipy.signal` because they are installed). This module's server, one per
pytest process, started at its first use, imports them once; each command is then a child
forked from it: a process of its own (its pid, signals, exit status, a session of its own when
asked) that sets its standard streams, working directory, environment, `sys.argv` and
`sys.path` as the command would have, runs the module as `python -m` does (`__main__`, with
its `__spec__`: Lightning's DDP launcher starts the other ranks from it, as real processes),
and exits through the interpreter's own shutdown (atexit, exit status, death by SIGINT).

A script (`[sys.executable, "path/to/script.py", ...]`) is forked too: it runs as `python
script.py` runs it (`__main__`, its folder first on `sys.path`), its own imports beyond the
preloaded modules made in the child.

What it cannot give: anything a command does while importing (its warnings, environment
variables read at import, such as OMP_NUM_THREADS) happens once, in the server. The test of
what a run prints besides its own messages (library noise, tests/test_console.py) starts a
real process.

`run` and `start` take the `subprocess.run` / `subprocess.Popen` arguments the tests use; a
command that is neither `[sys.executable, "-m", <a preloaded module>, ...]` nor
`[sys.executable, <a .py file>, ...]` gets a real process (`sys.executable` also as a path
relative to the command's working directory, as `fewzero.train.interpreter` prints it).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

PRELOADED = ("fewzero.train", "fewzero.eval")


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, for a child of the server."""

    def __init__(self, connection: socket.socket, args: list[str]):
        self.args, self._connection, self.returncode = args, connection, None
        self.pid = int(self._receive(None))

    def _receive(self, timeout: float | None) -> str:
        self._connection.settimeout(timeout)
        message = self._connection.recv(64)
        if not message:
            raise RuntimeError(f"the fork server died while running {self.args}")
        return message.decode()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = int(self._receive(timeout))
            except (TimeoutError, BlockingIOError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._connection.close()
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            return self.wait()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # not once the server has reaped it: its pid may be reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = ForkedProcess | subprocess.Popen

_server: subprocess.Popen | None = None
_address = ""


def _server_address() -> str:
    """Start the server (once per pytest process) and return its socket's path."""
    global _server, _address
    if _server is None or _server.poll() is not None:
        _address = os.path.join(tempfile.mkdtemp(prefix="fewzero-cli-"), "socket")
        _server = subprocess.Popen([sys.executable, __file__, _address], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE)
        if _server.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the fork server did not start (exit status {_server.wait()})")
        atexit.register(_stop_server, _server, os.path.dirname(_address))
    return _address


def _stop_server(server: subprocess.Popen, folder: str) -> None:
    server.stdin.close()  # its end of file stops the server
    server.wait(timeout=60)  # and its processes' CPU time counts as this process's children's
    shutil.rmtree(folder, ignore_errors=True)


def _fileno(stream: int | IO | None, default: int) -> int:
    return default if stream is None else stream if isinstance(stream, int) else stream.fileno()


def start(args: list[str], stdout: int | IO | None = None, stderr: int | IO | None = None,
          env: dict[str, str] | None = None, cwd: str | Path | None = None,
          start_new_session: bool = False, default_sigint: bool = False) -> Process:
    """`subprocess.Popen(args, ...)`, forked from the server where `args` runs a preloaded module
    or a script.

    The command ignores SIGINT where this process does, as a real child would (pytest-xdist's
    workers ignore it), unless `default_sigint`: then Ctrl-C raises KeyboardInterrupt in it, as
    in a command started from a terminal.
    """
    if not all(s is None or isinstance(s, int) and s >= 0 or hasattr(s, "fileno")
               for s in (stdout, stderr)):
        raise ValueError("stdout and stderr: a file or a descriptor (no PIPE); run() captures")
    # this interpreter, also as the commands a run prints name it (`.venv/bin/python`)
    this_python = bool(args) and os.path.normpath(os.path.join(cwd or os.getcwd(), args[0])) == sys.executable
    module = this_python and len(args) > 2 and args[1] == "-m" and args[2] in PRELOADED
    script = (this_python and len(args) > 1 and args[1].endswith(".py")
              and Path(cwd or ".", args[1]).is_file())
    if not (module or script):
        default = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if default_sigint else None
        return subprocess.Popen(args, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                start_new_session=start_new_session, preexec_fn=default)
    ignores_sigint = signal.getsignal(signal.SIGINT) == signal.SIG_IGN and not default_sigint
    main = {"module": args[2], "argv": args[3:]} if module else {"script": args[1], "argv": args[2:]}
    request = {**main, "cwd": str(cwd or os.getcwd()),
               "env": dict(os.environ if env is None else env), "new_session": start_new_session,
               "ignores_sigint": ignores_sigint}
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect(_server_address())
    with open(os.devnull, "rb") as stdin:
        socket.send_fds(connection, [json.dumps(request).encode()],
                        [stdin.fileno(), _fileno(stdout, 1), _fileno(stderr, 2)])
    return ForkedProcess(connection, list(args))


def run(args: list[str], capture_output: bool = False, text: bool = False, check: bool = False,
        timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(args, ...)`, forked from the server where `args` runs a preloaded module
    or a script."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if capture_output:
            kwargs.update(stdout=out, stderr=err)
        process = start(args, **kwargs)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        captured = []
        for stream in (out, err):
            stream.seek(0)
            data = stream.read()
            captured.append((data.decode() if text else data) if capture_output else None)
    done = subprocess.CompletedProcess(args, returncode, *captured)
    if check:
        done.check_returncode()
    return done


def _serve(address: str) -> tuple[dict[str, Any], list[int], int]:
    """Fork a child per request until standard input closes. Returns only in a child: its
    request, its standard streams' descriptors, and the descriptor to close once it has set
    itself up (the client hears of the child then, as `subprocess.Popen` returns once its
    child has started the command)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(16)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    children: dict[int, socket.socket] = {}
    while True:
        readable = select.select([listener, sys.stdin], [], [], 0.05)[0]
        while children:  # report each ended child's exit status to its client
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            with children.pop(pid) as connection, contextlib.suppress(OSError):  # client gone
                connection.send(str(os.waitstatus_to_exitcode(status)).encode())
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            sys.exit(0)
        if listener in readable:
            connection = listener.accept()[0]
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            set_up, child_set_up = os.pipe()
            pid = os.fork()
            if pid == 0:
                for other in (listener, connection, *children.values()):
                    other.close()
                os.close(set_up)
                return json.loads(message), fds, child_set_up
            for fd in (*fds, child_set_up):
                os.close(fd)
            os.read(set_up, 1)  # end of file: the child has set itself up (or died)
            os.close(set_up)
            with contextlib.suppress(OSError):
                connection.send(str(pid).encode())
            children[pid] = connection


def _python_path(environ: Any) -> list[str]:
    return [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _become(request: dict[str, Any], fds: list[int], set_up: int) -> None:
    """Make this forked child what `python -m <module> <argv>` (or `python <script> <argv>`)
    would be, but for its imports."""
    if request["new_session"]:
        os.setsid()
    # SIGINT as `python` sets it at start-up: ignored if inherited so, else KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["ignores_sigint"] else signal.default_int_handler)
    for target, fd in enumerate(fds):  # over the server's own streams
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    # sys.path as `python -m` starts it: the working directory (a script's folder for `python
    # script.py`), PYTHONPATH, then the rest
    server_path = _python_path(os.environ)
    rest = [p for p in sys.path[1:] if p not in server_path]
    os.environ.clear()
    os.environ.update(request["env"])
    first = os.path.dirname(os.path.abspath(request["script"])) if "script" in request else os.getcwd()
    sys.path[:] = [first, *_python_path(os.environ), *rest]
    sys.argv = [request.get("script") or request["module"], *request["argv"]]
    os.close(set_up)


if __name__ == "__main__":
    import runpy

    for module in PRELOADED:
        __import__(module)
    # the imports stay out of every child's garbage collections (as in conftest.py), and the
    # collector writes none of their pages: the children share them with the server
    gc.collect()
    gc.freeze()
    request = _serve(sys.argv[1])
    _become(*request)
    if "script" in request[0]:
        runpy.run_path(sys.argv[0], run_name="__main__")  # as `python script.py` runs it
    else:
        runpy._run_module_as_main(sys.argv[0])  # what `python -m` calls
