"""System mode on a shared host: one daemon user, two notebook users, real uids (the tests run as
root and switch with subprocess's user=/group=; the uids need not exist in /etc/passwd).

uvkerneld is installed the way an admin would, into a venv outside /root (other users cannot
traverse /root), from Debian's /usr/bin/python3.11.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import wait_until

from uvkerneld.uv import find_uv

SYSTEM_PYTHON = shutil.which("python3.11", path="/usr/bin") or shutil.which("python3", path="/usr/bin")
REPO = Path(__file__).resolve().parent.parent
DAEMON_UID, UID_A, UID_B = 61000, 61001, 61002
NETWORK_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY",
                     "https_proxy", "http_proxy", "no_proxy", "UV_INDEX_URL", "UV_DEFAULT_INDEX")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root"),
    pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a Python in /usr/bin"),
]


class Host:
    """A shared host: a system-wide uvkerneld, its daemon running as DAEMON_UID, user homes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "opt" / "uvkerneld"
        self.python = str(self.venv / "bin" / "python")
        self.socket = root / "run" / "uvkerneld.sock"
        self.state_dir = root / "var" / "lib" / "uvkerneld"
        self.venvs_dir = self.state_dir / "venvs"
        self.cache_dir = root / "var" / "cache" / "uvkerneld"
        self.jupyter = root / "share" / "jupyter"
        self.daemon: subprocess.Popen[bytes] | None = None

    def home(self, uid: int) -> Path:
        home = self.root / "home" / str(uid)
        if not home.exists():
            home.mkdir(parents=True)
            os.chown(home, uid, uid)
            home.chmod(0o700)
        return home

    def base_env(self) -> dict[str, str]:
        env = {name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ}
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        return env

    def user_env(self, uid: int, **extra: str) -> dict[str, str]:
        home = self.home(uid)
        return dict(
            self.base_env(), HOME=str(home), JUPYTER_PATH=str(self.jupyter),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTER_CONFIG_DIR=str(home / "config"), UVKERNELD_SOCKET=str(self.socket),
            # Clients trust only the daemon's uid; it has no passwd entry here, so name it.
            **dict({"UVKERNELD_DAEMON_USER": str(DAEMON_UID)}, **extra),
        )

    def run_as(self, uid: int, argv: list[str], cwd: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, user=uid, group=uid, extra_groups=[], env=self.user_env(uid, **extra_env),
            cwd=str(cwd or self.home(uid)), capture_output=True, text=True, timeout=600,
        )

    def python_as(self, uid: int, code: str, *args: str) -> Any:
        result = self.run_as(uid, [self.python, "-c", textwrap.dedent(code), *args])
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def kernel_as(self, uid: int, notebook: str, code: str) -> dict[str, Any]:
        """Start a kernel as ``uid`` through jupyter_client and the installed kernelspec, run code."""
        probe = self.root / "kernel_probe.py"
        path = self.home(uid) / notebook
        if not path.exists():  # the kernel refuses a UVKERNEL_NOTEBOOK that names no file
            assert self.run_as(uid, ["sh", "-c", 'echo "{}" > "$0"', str(path)]).returncode == 0
        # No UVKERNELD_DAEMON_USER of our own: the kernelspec's must be what makes kernels trust the daemon.
        result = self.run_as(uid, [self.python, str(probe), code], UVKERNEL_NOTEBOOK=str(path),
                             UVKERNELD_DAEMON_USER="")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    @property
    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")


KERNEL_PROBE = '''
import json, os, sys
from jupyter_client.manager import KernelManager
manager = KernelManager(kernel_name="uv")
manager.start_kernel(cwd=os.environ["HOME"])
kernel = manager.client()
kernel.start_channels()
try:
    kernel.wait_for_ready(timeout=300)
    chunks = []
    def hook(message):
        if message["msg_type"] == "stream":
            chunks.append(message["content"]["text"])
        elif message["msg_type"] == "error":
            chunks.append("\\n".join(message["content"]["traceback"]))
    reply = kernel.execute_interactive(sys.argv[1], timeout=300, output_hook=hook)
    print(json.dumps({"status": reply["content"]["status"], "output": "".join(chunks)}))
finally:
    kernel.stop_channels()
    manager.shutdown_kernel(now=True)
'''


@pytest.fixture(scope="module")
def host(uv_cache: Path) -> Iterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="uvk-sys-", dir="/tmp"))
    root.chmod(0o755)
    host = Host(root)
    uv = find_uv(None)
    uv_env = dict(os.environ, UV_CACHE_DIR=str(uv_cache))
    # The admin's install: a system-wide venv holding uvkerneld and its dependencies.
    subprocess.run([uv, "venv", "-q", "--python", SYSTEM_PYTHON, str(host.venv)], env=uv_env, check=True, timeout=300)
    subprocess.run([uv, "pip", "install", "-q", "--compile-bytecode", "--python", host.python, str(REPO)],
                   env=uv_env, check=True, timeout=600)
    subprocess.run([host.python, "-m", "uvkerneld.ctl", "install-kernelspec", "--prefix", str(root),
                    "--socket", str(host.socket), "--daemon-user", str(DAEMON_UID)], check=True, capture_output=True, timeout=120)
    (root / "kernel_probe.py").write_text(KERNEL_PROBE)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    # What systemd's StateDirectory=/CacheDirectory=/RuntimeDirectory= would create for User=.
    for directory in (host.socket.parent, host.state_dir, host.cache_dir):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, DAEMON_UID, DAEMON_UID)
        directory.chmod(0o755)
    log = open(root / "daemon.log", "wb")
    host.daemon = subprocess.Popen(
        [host.python, "-m", "uvkerneld", "--mode", "system", "--socket", str(host.socket),
         "--state-dir", str(host.state_dir), "--cache-dir", str(host.cache_dir),
         "--venvs-dir", str(host.venvs_dir), "--pool-size", "1", "--log-level", "debug"],
        user=DAEMON_UID, group=DAEMON_UID, extra_groups=[], cwd="/", stdin=subprocess.DEVNULL,
        stdout=log, stderr=subprocess.STDOUT, env=dict(host.base_env(), HOME=str(host.state_dir)),
    )
    log.close()
    wait_until(host.socket.exists, 60, "the system daemon's socket")
    yield host
    host.daemon.send_signal(signal.SIGTERM)
    try:
        assert host.daemon.wait(60) == 0, host.log
    finally:
        if host.daemon.poll() is None:
            host.daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def env_of(host: Host, uid: int, notebook: str) -> str:
    return host.python_as(uid, """
        import json, sys
        from uvkerneld import client
        print(json.dumps(client.request(sys.argv[1], "acquire", {"key": {"kind": "notebook", "value": sys.argv[2]}}, 600)["path"]))
        """, str(host.socket), str(host.home(uid) / notebook))


def protocol_error_as(host: Host, uid: int, op: str, args: dict[str, Any]) -> dict[str, str]:
    return host.python_as(uid, """
        import json, sys
        from uvkerneld import client, protocol
        try:
            client.request(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), 120)
            print(json.dumps({"code": None}))
        except protocol.UvkError as exc:
            print(json.dumps({"code": exc.code, "message": exc.message}))
        """, str(host.socket), op, json.dumps(args))


def test_socket_and_files_have_the_shared_host_permissions(host: Host) -> None:
    assert host.socket.stat().st_mode & 0o777 == 0o666
    assert (host.state_dir / "state.db").stat().st_mode & 0o777 == 0o600
    assert host.venvs_dir.stat().st_uid == DAEMON_UID and host.venvs_dir.stat().st_mode & 0o777 == 0o755


def test_kernel_runs_as_its_user_in_a_venv_it_cannot_change(host: Host) -> None:
    facts_code = """
import glob, json, os, sys
facts = {"uid": os.getuid(), "prefix": sys.prefix}
target = glob.glob(sys.prefix + "/lib/python*/site-packages/ipykernel/__init__.py")[0]
for name, action in (("venv_file", lambda: open(target, "a")),
                     ("venv_dir", lambda: open(os.path.join(os.path.dirname(target), "evil.py"), "w")),
                     ("cache", lambda: open(%r + "/evil", "w"))):
    try:
        action()
        facts[name] = "writable"
    except PermissionError:
        facts[name] = "denied"
print(json.dumps(facts))
""" % str(host.cache_dir)
    result = host.kernel_as(UID_A, "a.ipynb", facts_code)
    assert result["status"] == "ok", result
    facts = json.loads(result["output"].strip().splitlines()[-1])
    assert facts["uid"] == UID_A
    assert facts["prefix"].startswith(str(host.venvs_dir) + "/")
    assert facts["venv_file"] == facts["venv_dir"] == facts["cache"] == "denied"
    # %pip still works: the daemon installs on the user's behalf, into the user's env only.
    result = host.kernel_as(UID_A, "a.ipynb", "%pip install six==1.16.0\nimport six; print('six', six.__version__)")
    assert "six 1.16.0" in result["output"], result


def test_users_cannot_touch_each_others_envs(host: Host) -> None:
    env_a = env_of(host, UID_A, "shared-name.ipynb")
    # B asking for the very same notebook path gets B's own env: keys are scoped by the peer uid.
    env_b = env_of(host, UID_B, "shared-name.ipynb")
    assert env_a != env_b
    for op, args in (("pip", {"env": env_a, "argv": ["install", "six"]}),
                     ("installs", {"env": env_a}),
                     ("remove", {"env": env_a})):
        error = protocol_error_as(host, UID_B, op, args)
        assert error["code"] == "not_found" and "uid %d does not own an env at %s" % (UID_B, env_a) in error["message"]
    # The shim in A's env, run by B, is refused the same way.
    result = host.run_as(UID_B, [env_a + "/bin/pip", "install", "six"])
    assert result.returncode == 2 and "does not own an env" in result.stderr
    assert Path(env_a).is_dir()


def test_hardlinked_cache_files_are_writable_by_neither_user(host: Host) -> None:
    env_a = env_of(host, UID_A, "links.ipynb")
    linked = next(
        str(path) for path in Path(env_a).glob("lib/python*/site-packages/**/*.py") if path.stat().st_nlink > 1
    )
    for uid in (UID_A, UID_B):
        verdict = host.python_as(uid, """
            import json, os, sys
            try:
                open(sys.argv[1], "a")
                print(json.dumps("writable"))
            except PermissionError:
                print(json.dumps("denied" if not os.access(sys.argv[1], os.W_OK) else "inconsistent"))
            """, linked)
        assert verdict == "denied"


IN_OPEN, IN_ACCESS = 0x20, 0x01


class OpenWatch:
    """inotify on paths: did anyone open or read them?"""

    def __init__(self, *paths: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        for path in paths:
            assert self.libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN | IN_ACCESS) >= 0

    def events(self) -> bytes:
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.fd)


def test_local_paths_and_foreign_requirement_files_are_refused_unread(host: Host) -> None:
    private = host.root / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    secret = private / "secret.txt"
    secret.write_text("six\n")
    package = host.home(UID_A) / "pkg"
    package.mkdir(exist_ok=True)
    (package / "pyproject.toml").write_text('[project]\nname = "pkg"\nversion = "1"\n')
    subprocess.run(["chown", "-R", "%d:%d" % (UID_A, UID_A), str(package)], check=True)
    env_a = env_of(host, UID_A, "local.ipynb")
    watch = OpenWatch(secret, package, package / "pyproject.toml")
    try:
        result = host.run_as(UID_A, [env_a + "/bin/pip", "install", "./pkg"])
        assert result.returncode == 2
        assert "not possible on a shared host: the daemon never reads your files" in result.stderr
        result = host.run_as(UID_A, [env_a + "/bin/pip", "install", "-r", str(secret)])
        assert result.returncode == 2 and "cannot read %s: Permission denied" % secret in result.stderr
        # A client that skips the shim and names the file inside "contents" is refused too.
        error = protocol_error_as(host, UID_A, "pip", {"env": env_a, "argv": ["install", "-r", "r.txt"],
                                                       "files": ["-r %s\n" % secret]})
        assert error["code"] == "bad_request" and "option -r is not supported" in error["message"]
        error = protocol_error_as(host, UID_A, "pip", {"env": env_a, "argv": ["install", str(package)]})
        assert error["code"] == "not_allowed"
        assert watch.events() == b"", "someone opened the secret file or the package"
    finally:
        watch.close()
    installed = host.python_as(UID_A, """
        import json, os, sys, glob
        print(json.dumps(sorted(os.listdir(glob.glob(sys.argv[1] + "/lib/python*/site-packages")[0]))))
        """, env_a)
    assert not any(name == "pkg" or name.startswith("pkg-") for name in installed)


# Run inside a kernel as the notebook's user: save the notebook (change it on disk), then wait
# until the daemon knows the file as saved. The kernel reports saves itself: a system daemon may
# not look into the user's folder.
SAVE_AND_WAIT = '''
import json, os, socket, struct, sys, time
notebook = os.environ["UVKERNEL_NOTEBOOK_FILE"]
with open(notebook, "a") as handle:
    handle.write(" " * 100)
st = os.stat(notebook)
saved = "%d:%d:%d:%d" % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
def show():
    body = json.dumps({"v": 1, "id": 1, "op": "show", "args": {"key": {"kind": "notebook", "value": notebook}}}).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(os.environ["UVKERNELD_SOCKET"])
        sock.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            data += sock.recv(65536)
    return json.loads(data[4:])["result"]
deadline = time.monotonic() + 60
while show()["notebook_file"] != saved:
    assert time.monotonic() < deadline, "the daemon never learned of the save"
    time.sleep(0.1)
print(sys.prefix)
'''


def test_a_notebook_saved_then_renamed_keeps_its_env_in_system_mode(host: Host) -> None:
    home = host.home(UID_A)
    draft = home / "draft.ipynb"
    host.run_as(UID_A, ["sh", "-c", "echo '{}' > %s" % draft])
    result = host.kernel_as(UID_A, "draft.ipynb", SAVE_AND_WAIT)
    assert result["status"] == "ok", result
    prefix = result["output"].strip().splitlines()[-1]
    assert host.run_as(UID_A, ["mv", str(draft), str(home / "final.ipynb")]).returncode == 0
    after = host.kernel_as(UID_A, "final.ipynb", "import sys; print(sys.prefix)")
    assert after["output"].strip().splitlines()[-1] == prefix
    assert "was renamed to %s" % (home / "final.ipynb") in host.log
    # Reports are authorized like everything else: B cannot set the identity of A's env.
    error = protocol_error_as(host, UID_B, "notebook_saved",
                              {"env": prefix, "file": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4}})
    assert error["code"] == "not_found" and "uid %d does not own an env at %s" % (UID_B, prefix) in error["message"]
