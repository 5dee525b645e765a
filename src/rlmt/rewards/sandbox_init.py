"""The child side of :mod:`rlmt.rewards.sandbox`: runs as ``python -I -S -c <this file> MARKER CONFIG``.

Standard library only (nothing of rlmt is visible in the child), and never imported by rlmt: the parent reads
this file and passes it as the ``-c`` program. It builds the isolation layers in order, reports on the status
pipe, and runs the untrusted program::

    outer (in the parent's PID namespace; relays the exit status)
      unshare(USER | NS | NET | PID | IPC | UTS), uid/gid maps (uid 1000 inside -> one uid outside)
      +-- init (PID 1 of the new PID namespace; reaper)
            private mounts: a read-only tmpfs root holding read-only binds of the interpreter and system
            libraries only, empty tmpfs over every site-packages, /dev/{null,zero,full,random,urandom},
            a size-limited writable tmpfs at /tmp (the cwd); pivot_root; capabilities dropped
            +-- program (rlimits, no_new_privs, Python-level blocks, then the untrusted code as __main__)

When init exits, the kernel kills every process left in the namespace. A layer that cannot be built is
reported as ``{"failed": layer, "detail": ...}`` and the program does not run, unless the configuration allows
``best_effort``, where the layer is listed under ``missing`` and skipped. The status pipe is written once, by
the program's process just before the untrusted code runs, and closed first, so that code cannot write to it.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
INSIDE_UID = 1000
DEVICES = ("null", "zero", "full", "random", "urandom")
# statvfs f_flag bit -> mount flag, for the flags a bind in a user namespace must keep (they are locked)
LOCKED = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
          (2048, MS_NODIRATIME), (4096, MS_RELATIME))

cfg = json.loads(sys.argv[2])
status_fd, best_effort = cfg["status_fd"], cfg["best_effort"]
missing = []
libc = ctypes.CDLL(None, use_errno=True)


class LayerError(Exception):
    """A layer that could not be built: ``args = (layer, detail)``."""


def report_and_exit(message):
    os.write(status_fd, json.dumps(message).encode())
    os._exit(125)


def layer(name, fn):
    """Build one layer; a failure ends the run (strict) or is recorded and skipped (best effort)."""
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - any failure to build a layer is that layer missing
        detail = e.args[1] if isinstance(e, LayerError) else f"{type(e).__name__}: {e}"
        if not best_effort:
            report_and_exit({"failed": name, "detail": detail})
        missing.append(name)
        return False


def call(what, rc):
    if rc != 0:
        raise LayerError(what, f"{what}: {os.strerror(ctypes.get_errno())}")


def drop_uid():
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change clears it; the uid maps below need it


def user_namespace():
    uid, gid = os.getuid(), os.getgid()
    call("unshare(CLONE_NEWUSER)", libc.unshare(CLONE_NEWUSER))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{INSIDE_UID} {uid} 1"),
                       ("gid_map", f"{INSIDE_UID} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def other_namespaces():
    call("unshare(NEWNS|NEWNET|NEWPID|NEWIPC|NEWUTS)",
         libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS))


def mount(source, target, fstype, flags, data=None):
    call(f"mount {target}", libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                                       flags, data and data.encode()))


def bind_read_only(source, target, extra=0):
    """Bind ``source`` at ``target`` read-only, keeping the flags the source mount locks."""
    mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | extra
    kept = os.statvfs(source).f_flag
    flags |= sum(ms for st, ms in LOCKED if kept & st)
    mount(None, target, None, flags)


def makedirs(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)


def filesystem():
    new_root = os.getcwd()
    for name in ("user", "mnt", "net", "pid", "ipc", "uts", "cgroup"):
        try:  # no nested namespaces: an extra (nesting cannot unlock these mounts), so not a required layer
            with open(f"/proc/sys/user/max_{name}_namespaces", "w") as f:
                f.write("0")
        except OSError:
            pass
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path in cfg["expose"]:
        target = new_root + path
        if os.path.islink(path):
            makedirs(os.path.dirname(target))
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            makedirs(target)
            bind_read_only(path, target)
        elif os.path.isfile(path):
            makedirs(os.path.dirname(target))
            open(target, "w").close()
            bind_read_only(path, target)
    for path in cfg["hide"]:  # site-packages under an exposed tree: an empty read-only tmpfs over it
        if os.path.isdir(new_root + path):
            mount("tmpfs", new_root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,nr_inodes=2")
    makedirs(new_root + "/dev")
    for dev in DEVICES:
        open(f"{new_root}/dev/{dev}", "w").close()
        bind_read_only(f"/dev/{dev}", f"{new_root}/dev/{dev}")
    makedirs(new_root + "/tmp")
    mount("tmpfs", new_root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['scratch_bytes']},nr_inodes=4096,mode=0777")
    os.chdir(new_root)
    call("pivot_root", libc.pivot_root(b".", b"."))
    call("umount old root", libc.umount2(b".", MNT_DETACH))
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/tmp")


def drop_capabilities():
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all empty
    call("capset", libc.capset(header, data))
    call("no_new_privs", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def relay(pid, read_fd):
    """Outer process: wait for init, then exit as the program did (init sends its wait status here)."""
    os.waitpid(pid, 0)
    raw = os.read(read_fd, 64)
    kind, _, value = raw.decode().partition(" ")
    if kind == "signal":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(int(value), signal.SIG_DFL)
        os.kill(os.getpid(), int(value))
    os._exit(int(value) if kind == "exit" else 125)


def init(write_fd):
    """PID 1 of the namespace: wait for the program and send its wait status to the outer process."""
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        return
    os.close(0)
    os.close(status_fd)
    while True:
        got, code = os.waitpid(-1, 0)  # reap orphans too; stop when the program itself ends
        if got == pid:
            break
    message = f"signal {os.WTERMSIG(code)}" if os.WIFSIGNALED(code) else f"exit {os.WEXITSTATUS(code)}"
    os.write(write_fd, message.encode())
    os._exit(0)


def main():
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    os.unlink("main.py")
    if cfg["uid"] is not None:
        layer("separate uid", drop_uid)
    namespaced = layer("user namespace", user_namespace) and layer("mount, PID and network namespaces",
                                                                    other_namespaces)
    if namespaced:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(0)
            os.close(status_fd)
            os.close(write_fd)
            relay(pid, read_fd)
        os.close(read_fd)
        layer("filesystem", filesystem)
        layer("capability drop", drop_capabilities)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        init(write_fd)
    limits(cfg["rlimits"], extra_tasks=2 if namespaced else 0)
    os.write(status_fd, json.dumps({"ready": True, "missing": missing}).encode())
    os.close(status_fd)
    python_blocks()
    run(source)


def limits(rlimits, extra_tasks):
    """Apply the rlimits; RLIMIT_NPROC counts the outer and init processes too (same uid), hence extra_tasks."""
    for name, soft, hard in rlimits:
        if name == "RLIMIT_NPROC":
            soft, hard = soft + extra_tasks, hard + extra_tasks
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError):
            if name != "RLIMIT_NOFILE":
                raise
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def blocked(*args, **kwargs):
    raise PermissionError("blocked by the rlmt sandbox")


def python_blocks():
    """Defence in depth (bypassable from Python): process creation and sockets refuse at the Python level."""
    if cfg["block_processes"]:
        import posix
        for mod in (os, posix):
            for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
                         "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                         "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
                if hasattr(mod, name):
                    setattr(mod, name, blocked)
        import _posixsubprocess
        import subprocess  # kept importable (asyncio needs its constants), but inert
        _posixsubprocess.fork_exec = blocked
        for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
            setattr(subprocess, name, blocked)
        for name in ("multiprocessing", "pty", "concurrent.futures.process"):
            sys.modules[name] = None
    import _socket
    import socket

    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is blocked by the rlmt sandbox")

    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = BlockedSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server"):
        for mod in (socket, _socket):
            if hasattr(mod, name):
                setattr(mod, name, blocked)


def run(source):
    import types
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    for name in list(globals()):  # the program must not find this bootstrap's state (config, fds) in __main__
        if not name.startswith("__"):
            del globals()[name]
    exec(compile(source, "main.py", "exec"), module.__dict__)


main()
