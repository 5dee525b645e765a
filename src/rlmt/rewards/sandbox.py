"""Run untrusted (model-written) Python in a throwaway, isolated, resource-limited child process.

``run_sandboxed(code, stdin, limits)`` starts a fresh interpreter in isolated mode (``-I -S``: no user site,
no site-packages, no ``PYTHON*`` variables) with a clean environment, in its own session, and returns what
it printed. The child (:mod:`rlmt.rewards.sandbox_init`) builds these layers before the code runs:

* **Namespaces** (user, mount, PID, network, IPC, UTS; unprivileged, so the same as root and not). The
  program runs as uid 1000 of its own user namespace with no capabilities and ``no_new_privs``; it sees a
  read-only root holding only the interpreter, the system libraries (``/usr``, ``/lib*``) and a few devices,
  with every site-packages directory emptied; it can write only a size-limited tmpfs at ``/tmp`` (its cwd),
  which vanishes with it; there is no ``/proc``, no ``/home``, no project, no data. In its PID namespace it
  cannot see or signal any process outside; when it ends, the kernel kills everything it started. Its
  network namespace has only a downed loopback: no connection anywhere, even through ``ctypes``.
* **A separate uid** as well when we run as root: the child first drops to a fresh uid of its own, so
  nothing it does outside the namespace is done as root (this needs an interpreter other users may read:
  the venv's may be swapped for ``/usr/bin/python3``).
* **Resource limits.** Address space, CPU seconds, file size, process count, no core dumps; the parent
  enforces wall time and per-stream output caps, reading with a bounded reader and killing on overflow.
* **Python-level blocks** (bypassable, defence in depth): ``os.fork``/``exec*``/``spawn*``/``system``/
  ``kill``, ``subprocess.Popen`` and friends and socket creation are replaced, and ``multiprocessing`` and
  ``pty`` made unimportable, before user code runs.

**Fail closed.** When a layer cannot be built (user namespaces disabled by ``sysctl``, refused by a seccomp
profile such as Docker's default, or by AppArmor), :func:`run_sandboxed` raises :class:`SandboxUnavailable`
naming the layer and nothing runs. ``isolation="best_effort"`` is the explicit opt-in to run anyway with the
layers that could be built (listed in ``SandboxResult.missing_layers``).

After every run the whole process group (and, as root, every process of the sandbox uid) is killed with
SIGKILL and the scratch directory removed.
"""

from __future__ import annotations

import dataclasses
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
    scratch_bytes: int = 32 * 1024 * 1024  # size of the child's writable /tmp (a tmpfs, in memory)

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_mb", "max_processes", "output_bytes", "file_size_bytes",
                     "scratch_bytes"):
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
    missing_layers: tuple[str, ...] = ()  # isolation layers skipped (only with isolation="best_effort")


ISOLATION = ("strict", "best_effort")
_INIT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
_SYSTEM = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")


class SandboxUnavailable(RuntimeError):
    """An isolation layer could not be built, so nothing ran (see ``isolation`` of :func:`run_sandboxed`)."""

    def __init__(self, layer: str, detail: str):
        super().__init__(f"the code sandbox cannot isolate the program: {layer} unavailable ({detail}); "
                         "see the README's security section (or opt in with isolation=best_effort)")
        self.layer, self.detail = layer, detail


def run_sandboxed(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
                  isolation: str = "strict") -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed interpreter with ``stdin``; see the module docstring.

    ``isolation="strict"`` raises :class:`SandboxUnavailable` if any layer cannot be built;
    ``"best_effort"`` runs with the layers that could be built."""
    if isolation not in ISOLATION:
        raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
    interp = _interpreter()
    uid = _UID_BASE + (os.getpid() % 4_000_000) * 512 + next(_UID_COUNTER) % 512 if interp.drop_uid else None
    status_r, status_w = os.pipe()
    cfg = {
        "uid": uid, "status_fd": status_w, "best_effort": isolation == "best_effort",
        "block_processes": limits.max_processes <= 1, "scratch_bytes": limits.scratch_bytes,
        "expose": [p for p in (*_SYSTEM, *interp.trees) if os.path.lexists(p)], "hide": list(interp.site_dirs),
        "rlimits": [
            ("RLIMIT_AS", limits.memory_mb << 20, limits.memory_mb << 20),
            ("RLIMIT_CPU", math.ceil(limits.cpu_seconds), math.ceil(limits.cpu_seconds) + 1),
            ("RLIMIT_FSIZE", limits.file_size_bytes, limits.file_size_bytes),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NOFILE", 256, 256),
        ],
    }
    with open(_INIT_SOURCE, encoding="utf-8") as f:
        init_source = f.read()
    workdir = tempfile.mkdtemp(prefix="rlmt-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [interp.python, "-I", "-S", "-c", init_source, f"{MARKER}={os.getpid()}", json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                cwd=workdir, env=dict(_CLEAN_ENV), start_new_session=True, close_fds=True,
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        try:
            status = _read_status(status_r, start + limits.wall_seconds)
            if status.get("failed"):
                raise SandboxUnavailable(status["failed"], status.get("detail", ""))
            if not status.get("ready"):
                _kill_sandbox(proc.pid, uid)
                proc.wait()
                raise SandboxUnavailable("start-up", status.get("detail") or proc.stderr.read(2000).decode(
                    "utf-8", "replace").strip()[-300:] or f"exit status {proc.returncode}")
            out, err, reason = _communicate(proc, stdin.encode("utf-8"), start + limits.wall_seconds,
                                            limits.output_bytes)
        finally:
            os.close(status_r)
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
                         reason or _exit_reason(proc.returncode, stderr), wall,
                         tuple(status.get("missing", ())))


def _read_status(fd: int, deadline: float) -> dict:
    """The child's one status message (JSON), read until it closes the pipe or the deadline passes."""
    data = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(data) < 4096:
            timeout = deadline - time.monotonic()
            if timeout <= 0 or not sel.select(timeout):
                return {"detail": "the sandbox did not start before the wall-time limit"}
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    try:
        status = json.loads(bytes(data))
    except ValueError:
        return {"detail": "no status from the sandbox"}
    return status if isinstance(status, dict) else {"detail": "bad status from the sandbox"}


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


@dataclass(frozen=True)
class _Interpreter:
    python: str  # executable (real path)
    drop_uid: bool  # root, and the interpreter is readable by other users: the child drops to its own uid
    trees: tuple[str, ...]  # the installation's directories to expose read-only (beyond /usr and /lib*)
    site_dirs: tuple[str, ...]  # site-packages directories to hide under an empty tmpfs


_PROBE = """
import json, os, sys, sysconfig
paths = sysconfig.get_paths()
version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
site = {paths["purelib"], paths["platlib"]}
for base in ("/usr/lib", "/usr/local/lib", sys.base_prefix + "/lib", sys.base_exec_prefix + "/lib"):
    site |= {f"{base}/python3/dist-packages", f"{base}/{version}/site-packages", f"{base}/{version}/dist-packages"}
print(json.dumps({"prefix": sys.base_prefix, "exec_prefix": sys.base_exec_prefix,
                  "stdlib": os.path.dirname(os.__file__), "site": sorted(site)}))
"""


@functools.lru_cache(maxsize=1)
def _interpreter() -> _Interpreter:
    """The Python to run sandboxed code with, what of its installation the child needs, and whether it can
    drop to a separate uid.

    Dropping is possible only as root and only with an interpreter whose executable and standard library
    any user may read (a pyenv/venv interpreter under a private ``/root`` is not one), so when ours is not,
    the system ``/usr/bin/python3`` is tried; as root with neither, the uid layer is missing."""
    ours = os.path.realpath(sys.executable)
    candidates = (ours, "/usr/bin/python3") if os.geteuid() == 0 else (ours,)
    probed = []
    for candidate in candidates:
        if not os.path.exists(candidate):
            continue
        try:
            info = json.loads(subprocess.run(
                [candidate, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=30,
                env=dict(_CLEAN_ENV), check=True).stdout)
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
        trees = tuple(sorted({os.path.realpath(info[k]) for k in ("prefix", "exec_prefix")}
                             | {os.path.dirname(os.path.realpath(candidate))}))
        trees = tuple(t for t in trees if not any(t == s or t.startswith(s + "/") for s in _SYSTEM))
        found = _Interpreter(os.path.realpath(candidate), os.geteuid() == 0, trees, tuple(info["site"]))
        if os.geteuid() != 0 or (_others_can_read(candidate) and _others_can_read(info["stdlib"])):
            return found
        probed.append(found)
    if not probed:
        raise SandboxUnavailable("interpreter", f"{ours} -I -S does not start")
    return dataclasses.replace(probed[0], drop_uid=False)


def _others_can_read(path: str) -> bool:
    """Whether a user with no special relation to ``path`` can reach and read it (mode bits only)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)
