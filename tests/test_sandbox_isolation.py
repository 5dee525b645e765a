"""The sandbox's isolation layers, as root and as an ordinary user, and its refusal when a layer is missing.

The hostile programs run from a small driver process (the "trainer" here). The driver runs as this test's
user and, when the tests run as root, once more as ``nobody`` through ``setpriv --reuid 65534``: the
guarantees must be the same. The missing-layer cases run the driver under a seccomp filter that refuses one
system call with EPERM, which is what Docker's default profile does to ``unshare`` and ``mount``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
SANDBOX_FILES = ("sandbox.py", "sandbox_init.py")
AS_ROOT = os.geteuid() == 0

# Each program prints one JSON line; the driver collects them with what it saw outside.
DRIVER = r'''
import ctypes, json, os, socket, sys, tempfile
sys.path.insert(0, sys.argv[1])
import sandbox
from sandbox import SandboxLimits, run_sandboxed
secret, token = sys.argv[2], sys.argv[3]
limits = SandboxLimits(wall_seconds=5, cpu_seconds=5)
out = {"driver_uid": os.getuid()}

def run(code, **kw):
    res = run_sandboxed(code, limits=kw.pop("limits", limits), **kw)
    lines = res.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"stdout": res.stdout[-300:], "stderr": res.stderr[-500:], "returncode": res.returncode}

out["signal"] = run(f"""
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
r = libc.kill({os.getpid()}, 15); e = ctypes.get_errno()
libc.kill(-1, 9)
print(json.dumps([r, e]))""")

out["files"] = run(f"""
import json, os
def can_read(p):
    try:
        open(p, "rb").read(1)
        return True
    except OSError:
        return False
print(json.dumps({{"secret": can_read({secret!r}), "root": sorted(os.listdir("/")),
                  "visible": [p for p in ("/proc/1", "/proc/self", "/home", "/root", "/etc/passwd", {sys.argv[1]!r},
                                          {os.path.dirname(secret)!r}) if os.path.exists(p)]}}))""")

site = [os.path.join(d, f) for d in sandbox._interpreter().site_dirs if os.path.isdir(d) for f in os.listdir(d)][:1]
out["site_file"] = site
out["site"] = run(f"import json, os\nprint(json.dumps([os.path.exists(p) for p in {site!r}]))")

before = set(os.listdir(tempfile.gettempdir()))
out["writes"] = run(f"""
import json
done = []
for p in ("/tmp/{token}", "/dev/shm/{token}", "/var/tmp/{token}", "{token}", "/{token}", "/usr/{token}"):
    try:
        with open(p, "w") as f:
            f.write("x")
        done.append(p)
    except OSError:
        pass
print(json.dumps(done))""")
out["left_on_host"] = [p for p in (f"/tmp/{token}", f"/dev/shm/{token}", f"/var/tmp/{token}") if os.path.exists(p)]
out["new_temp_entries"] = sorted(set(os.listdir(tempfile.gettempdir())) - before)

out["daemon"] = run("""
import ctypes, json
libc = ctypes.CDLL(None)
pid = libc.fork()
if pid == 0:
    libc.setsid()
    libc.sleep(30)
    libc._exit(0)
print(json.dumps(pid))""", limits=SandboxLimits(wall_seconds=5, max_processes=4))
marker = f"{sandbox.MARKER}={os.getpid()}".encode()
alive = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker in f.read():
                with open(f"/proc/{pid}/stat") as g:
                    if g.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(int(pid))
    except OSError:
        pass
out["survivors"] = alive

with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    out["network"] = run(f"""
import ctypes, json, socket
real = [c for c in type.mro(socket.socket) if c.__module__ == "_socket"][0]
try:
    s = real(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1)
    s.connect(("127.0.0.1", {port}))
    print(json.dumps("connected"))
except OSError as e:
    print(json.dumps(e.strerror))""")

out["privileges"] = run(f"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(rc):
    return ctypes.get_errno() if rc != 0 else 0
res = {{"remount_rw": errno_of(libc.mount(None, b"/usr", None, 32 | 4096, None)),
       "unshare_user": errno_of(libc.unshare(0x10000000)),
       "setuid0": errno_of(libc.setuid(0))}}
try:
    open(os.path.join(os.path.dirname(os.__file__), "{token}"), "w")
    res["stdlib_write"] = 0
except OSError as e:
    res["stdlib_write"] = e.errno
print(json.dumps(res))""")
print(json.dumps(out))
'''


def _driver_dir() -> str:
    """A directory any user can read holding the sandbox's two (standard-library only) modules."""
    d = tempfile.mkdtemp(prefix="rlmt-sandbox-test-")
    for name in SANDBOX_FILES:
        shutil.copy(os.path.join(SRC, "rlmt", "rewards", name), d)
    with open(os.path.join(d, "driver.py"), "w") as f:
        f.write(DRIVER)
    os.chmod(d, 0o755)
    for name in os.listdir(d):
        os.chmod(os.path.join(d, name), 0o644)
    return d


def _world_readable_python() -> str | None:
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        probe = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", python, "-I", "-S", "-c",
                 "import os, sys; assert os.path.exists(os.path.realpath(sys.executable))"]
        if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
            return python
    return None


USERS = ["this user"] + (["nobody"] if AS_ROOT else [])


@pytest.mark.parametrize("user", USERS)
def test_isolation_layers_hold(user, tmp_path):
    d = _driver_dir()
    secret = os.path.join(d, "secret.txt")  # world-readable, like most of a user's files
    with open(secret, "w") as f:
        f.write("private")
    os.chmod(secret, 0o644)
    token = f"rlmt-leak-{os.getpid()}-{user.replace(' ', '-')}"
    try:
        if user == "nobody":
            python = _world_readable_python()
            assert python, "no interpreter that the nobody user can run"
            cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", python]
        else:
            cmd = [sys.executable]
        proc = subprocess.run([*cmd, os.path.join(d, "driver.py"), d, secret, token], capture_output=True,
                              text=True, timeout=120, cwd=d)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert out["driver_uid"] == (65534 if user == "nobody" else os.getuid())
    assert out["signal"] == [-1, 3]  # ESRCH: the trainer does not exist in the child's PID namespace
    files = out["files"]
    assert files["secret"] is False and files["visible"] == []
    assert set(files["root"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "tmp", "usr"}
    assert out["site_file"] and out["site"] == [False]  # site-packages are emptied
    assert out["writes"] == [f"/tmp/{token}", token]  # only its scratch /tmp (also its cwd) is writable
    assert out["left_on_host"] == [] and not [e for e in out["new_temp_entries"] if e.startswith("rlmt-sandbox-")]
    assert isinstance(out["daemon"], int) and out["daemon"] > 0 and out["survivors"] == []
    assert out["network"] == "Network is unreachable"
    privileges = out["privileges"]
    assert privileges["remount_rw"] == 1 and privileges["setuid0"] in (1, 22)  # EPERM; EINVAL: uid 0 is unmapped
    assert privileges["unshare_user"] in (1, 28)  # EPERM, or ENOSPC: nested namespaces are disallowed
    assert privileges["stdlib_write"] in (13, 30)  # EACCES or EROFS


SECCOMP = r'''
import ctypes, json, os, platform, sys, warnings
NR = {"x86_64": {"unshare": 272, "mount": 165, "pivot_root": 155},
      "aarch64": {"unshare": 97, "mount": 40, "pivot_root": 41}}[platform.machine()]
blocked = [NR[name] for name in sys.argv[1].split(",")]

class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

insns = [Filter(0x20, 0, 0, 0)]  # load the system call number
for nr in blocked:
    insns += [Filter(0x15, 0, 1, nr), Filter(0x06, 0, 0, 0x00050000 | 1)]  # == nr: return EPERM
insns.append(Filter(0x06, 0, 0, 0x7FFF0000))  # allow
prog = Program(len(insns), (Filter * len(insns))(*insns))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # no_new_privs, needed to install a filter
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER

from rlmt.rewards.code_tests import CodeTestsReward
from rlmt.rewards.sandbox import SandboxUnavailable, run_sandboxed
out = {}
try:
    run_sandboxed("print('ran')")
    out["strict"] = "ran"
except SandboxUnavailable as e:
    out["strict"] = [e.layer, str(e)]
res = run_sandboxed("print('ran')", isolation="best_effort")
out["best_effort"] = [res.stdout.strip(), list(res.missing_layers)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = CodeTestsReward().score([{"tests": [{"input": "", "output": "ran"}]}], ["print('ran')"])
out["reward"] = [result.scores, result.details[0].get("error"), [str(w.message) for w in caught]]
print(json.dumps(out))
'''


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="seccomp numbers known for 2 archs")
@pytest.mark.parametrize(("blocked", "layer"), [("unshare", "user namespace"), ("mount", "filesystem"),
                                                ("pivot_root", "filesystem")])
def test_a_missing_layer_fails_closed(blocked, layer):
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", SECCOMP, blocked], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["strict"][0] == layer and layer in out["strict"][1] and "best_effort" in out["strict"][1]
    ran, missing = out["best_effort"]
    assert ran == "ran" and layer in missing  # the explicit opt-in runs with what could be built
    scores, error, warned = out["reward"]
    assert scores == [None] and error == f"sandbox unavailable: {layer}"
    assert len(warned) == 1 and layer in warned[0]

