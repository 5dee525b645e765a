"""Run untrusted (model-written) Python in a throwaway, resource-limited child process.

``run_sandboxed(code, stdin, limits)`` starts a fresh interpreter in isolated mode (``-I -S``: no user site,
no site-packages, no ``PYTHON*`` variables) with a clean environment, in its own session, with a fresh
temporary working directory, and returns what it printed. The layers, from strongest to weakest:

* **Unprivileged user.** When we run as root (where ``RLIMIT_NPROC`` is not enforced) the child drops to a
  fresh uid of its own, so the kernel enforces ``RLIMIT_NPROC`` (no fork, no threads beyond the limit), the
  child cannot signal or ptrace our processes, read ``/proc/<parent>/environ`` or write outside its
  directory. Its processes are found by that uid afterwards and killed. This needs an interpreter whose
  standard library other users may read, so the venv's may be swapped for ``/usr/bin/python3``.
* **Network namespace.** ``unshare(CLONE_NEWNET)`` (``CLONE_NEWUSER`` added when not root) gives the child
  a network with only a downed loopback device: no connection anywhere, even through ``ctypes``.
* **Resource limits.** Address space, CPU seconds, file size, process count, no core dumps; the parent
  enforces wall time and per-stream output caps, reading with a bounded reader and killing on overflow.
* **Python-level blocks** (bypassable, defence in depth): ``os.fork``/``exec*``/``spawn*``/``system``/
  ``kill``, ``subprocess.Popen`` and friends and socket creation are replaced, and ``multiprocessing`` and
  ``pty`` made unimportable, before user code runs.

After every run the whole process group (and every process of the sandbox uid) is killed with SIGKILL, so
nothing the child started survives it.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Every sandboxed interpreter carries this (plus our pid) in its command line, and forks inherit it: tests
# use it to prove that nothing survives a run.
MARKER = "rlmt-sandbox-parent"
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
_CHUNK = 65536
# Sandbox uids: far above any real account; 512 per parent pid so concurrent trainers never share one.
_UID_BASE = 1_000_000_000
_UID_COUNTER = itertools.count()


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use; anything beyond it ends the run as a failure."""

    wall_seconds: float = 5.0  # wall-clock time from start to exit, enforced by the parent (kill)
    cpu_seconds: float = 5.0  # CPU time (RLIMIT_CPU, rounded up to whole seconds; SIGXCPU then SIGKILL)
    memory_mb: int = 512  # address space (RLIMIT_AS); allocating beyond it raises MemoryError
    max_processes: int = 1  # tasks of the sandbox uid incl. the child and its threads; 1 = no fork/thread
    output_bytes: int = 64 * 1024  # cap on stdout and on stderr each; the child is killed when exceeded
    file_size_bytes: int = 8 * 1024 * 1024  # largest file the child may write (RLIMIT_FSIZE)

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_mb", "max_processes", "output_bytes", "file_size_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class SandboxResult:
    """What a sandboxed run did. ``killed_reason`` is None for a normal exit, else why it ended:
    ``timeout``, ``output_limit``, ``memory`` (MemoryError), ``cpu`` (SIGXCPU) or ``signal:<NAME>``."""

    returncode: int
    stdout: str  # at most ``output_bytes`` bytes, decoded with replacement characters
    stderr: str
    timed_out: bool
    killed_reason: str | None
    wall_seconds: float


# Runs in the child, as root when we are root: drop into a network namespace, set limits, drop to the
# sandbox uid, block process and socket creation in Python, then run main.py as __main__.
_BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[2])
with open("main.py", encoding="utf-8") as f:
    src = f.read()
os.unlink("main.py")
try:
    import ctypes
    flags = 0x40000000 if os.geteuid() == 0 else 0x50000000  # CLONE_NEWNET (| CLONE_NEWUSER)
    ctypes.CDLL(None, use_errno=True).unshare(flags)
except Exception:
    pass
for name, soft, hard in cfg["rlimits"]:
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError):
        if name != "RLIMIT_NOFILE":
            raise
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])

def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the rlmt sandbox")

if cfg["block_processes"]:
    import posix
    for mod in (os, posix):
        for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
                     "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                     "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
    import _posixsubprocess, subprocess  # kept importable (asyncio needs its constants), but inert
    _posixsubprocess.fork_exec = _blocked
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _blocked)
    for name in ("multiprocessing", "pty", "concurrent.futures.process"):
        sys.modules[name] = None
import _socket, socket
class _BlockedSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is blocked by the rlmt sandbox")
socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _BlockedSocket
for name in ("socketpair", "fromfd", "create_connection", "create_server"):
    for mod in (socket, _socket):
        if hasattr(mod, name):
            setattr(mod, name, _blocked)
import types
main = types.ModuleType("__main__")
main.__file__ = "main.py"
sys.modules["__main__"] = main
sys.argv = ["main.py"]
exec(compile(src, "main.py", "exec"), main.__dict__)
"""


def run_sandboxed(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed interpreter with ``stdin``; see the module docstring."""
    python, drop_privileges = _interpreter()
    uid = _UID_BASE + (os.getpid() % 4_000_000) * 512 + next(_UID_COUNTER) % 512 if drop_privileges else None
    cfg = {
        "uid": uid,
        "block_processes": limits.max_processes <= 1,
        "rlimits": [
            ("RLIMIT_AS", limits.memory_mb << 20, limits.memory_mb << 20),
            ("RLIMIT_CPU", math.ceil(limits.cpu_seconds), math.ceil(limits.cpu_seconds) + 1),
            ("RLIMIT_FSIZE", limits.file_size_bytes, limits.file_size_bytes),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NOFILE", 256, 256),
        ],
    }
    workdir = tempfile.mkdtemp(prefix="rlmt-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
        start = time.monotonic()
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", _BOOTSTRAP, f"{MARKER}={os.getpid()}", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env=dict(_CLEAN_ENV), start_new_session=True, close_fds=True,
        )
        try:
            out, err, reason = _communicate(proc, stdin.encode("utf-8"), start + limits.wall_seconds,
                                            limits.output_bytes)
        finally:
            _kill_sandbox(proc.pid, uid)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None and not pipe.closed:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass
            proc.wait()
        wall = time.monotonic() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return SandboxResult(proc.returncode, stdout, stderr, reason == "timeout",
                         reason or _exit_reason(proc.returncode, stderr), wall)


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Feed ``data`` to the child and read its output until it exits, the deadline passes ("timeout") or
    a stream goes past ``cap`` bytes ("output_limit"). Keeps at most ``cap`` bytes per stream. The child
    is left unreaped, so its pid (and process group id) cannot be reused before we kill the group."""
    assert proc.stdin and proc.stdout and proc.stderr
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    stdin_fd, sent = proc.stdin.fileno(), 0
    reason: str | None = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if data:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while sel.get_map() and reason is None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(timeout):
                if key.fd == stdin_fd:
                    try:
                        sent += os.write(stdin_fd, data[sent:sent + _CHUNK])
                    except (BrokenPipeError, BlockingIOError, OSError):
                        sent = len(data)  # the child closed stdin or exited: it will not read the rest
                    if sent >= len(data):
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = cap - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    reason = "output_limit"
                    break
    if reason is None:
        reason = _wait_unreaped(proc.pid, deadline)
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), reason


def _wait_unreaped(pid: int, deadline: float) -> str | None:
    """Wait for ``pid`` to exit without reaping it; "timeout" if it is still running at ``deadline``."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return None
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(0.005)


def _kill_sandbox(pid: int, uid: int | None) -> None:
    """SIGKILL the child's process group and, when it ran as its own uid, every live process of that uid
    (which catches anything that left the group). Zombies are skipped: they are dead already."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(50):
        victims = _live_pids_of_uid(uid)
        if not victims:
            return
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def _live_pids_of_uid(uid: int) -> list[int]:
    """Pids of non-zombie processes whose real, effective, saved or fs uid is ``uid`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if str(uid) in fields.get("Uid", "").split() and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _exit_reason(returncode: int, stderr: str) -> str | None:
    """Why a child that we did not kill ended abnormally, or None for an ordinary exit."""
    if returncode < 0:
        if -returncode == signal.SIGXCPU:
            return "cpu"
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal:{-returncode}"
    lines = stderr.strip().splitlines()
    if returncode != 0 and lines and lines[-1].startswith("MemoryError"):
        return "memory"
    return None


@functools.lru_cache(maxsize=1)
def _interpreter() -> tuple[str, bool]:
    """The Python to run sandboxed code with, and whether the child can drop to an unprivileged uid.

    Dropping is possible only as root and only with an interpreter whose executable and standard library
    any user may read (a pyenv/venv interpreter under a private ``/root`` is not one), so when ours is not,
    the system ``/usr/bin/python3`` is tried before giving the uid drop up."""
    ours = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return ours, False
    for candidate in (ours, "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        try:
            stdlib = subprocess.run(
                [candidate, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                capture_output=True, text=True, timeout=30, env=dict(_CLEAN_ENV), check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if _others_can_read(candidate) and _others_can_read(stdlib):
            return os.path.realpath(candidate), True
    return ours, False


def _others_can_read(path: str) -> bool:
    """Whether a user with no special relation to ``path`` can reach and read it (mode bits only)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)
