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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

    def run_as(
        self, uid: int, argv: list[str], cwd: Path | None = None, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
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
    subprocess.run([uv, "venv", "-q", "--python", SYSTEM_PYTHON, str(host.venv)],
                   env=uv_env, check=True, timeout=300)
    subprocess.run([uv, "pip", "install", "-q", "--compile-bytecode", "--python", host.python, str(REPO)],
                   env=uv_env, check=True, timeout=600)
    subprocess.run([host.python, "-m", "uvkerneld.ctl", "install-kernelspec", "--prefix", str(root),
                    "--socket", str(host.socket), "--daemon-user", str(DAEMON_UID)],
                   check=True, capture_output=True, timeout=120)
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
        key = {"kind": "notebook", "value": sys.argv[2]}
        print(json.dumps(client.request(sys.argv[1], "acquire", {"key": key}, 600)["path"]))
        """, str(host.socket), str(host.home(uid) / notebook))


def kernels_started(host: Host) -> dict[str, int]:
    """The daemon's kernel-start counters, from `status` as a user asks for it."""
    return host.python_as(UID_A, """
        import json, sys
        from uvkerneld import client
        print(json.dumps(client.request(sys.argv[1], "status", None, 30)["kernels_started"]))
        """, str(host.socket))


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


@pytest.mark.slow
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
    result = host.kernel_as(UID_A, "a.ipynb",
                            "%pip install six==1.16.0\nimport six; print('six', six.__version__)")
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
        assert error["code"] == "not_found"
        assert "uid %d does not own an env at %s" % (UID_B, env_a) in error["message"]
    # The shim in A's env, run by B, is refused the same way.
    result = host.run_as(UID_B, [env_a + "/bin/pip", "install", "six"])
    assert result.returncode == 2 and "does not own an env" in result.stderr
    assert Path(env_a).is_dir()


def test_hardlinked_cache_files_are_writable_by_neither_user(host: Host) -> None:
    env_a = env_of(host, UID_A, "links.ipynb")
    linked = next(
        str(path) for path in Path(env_a).glob("lib/python*/site-packages/**/*.py")
        if path.stat().st_nlink > 1
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
    key = {"kind": "notebook", "value": notebook}
    body = json.dumps({"v": 1, "id": 1, "op": "show", "args": {"key": key}}).encode()
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
    renamed_before = kernels_started(host)["renamed"]
    assert host.run_as(UID_A, ["mv", str(draft), str(home / "final.ipynb")]).returncode == 0
    after = host.kernel_as(UID_A, "final.ipynb", "import sys; print(sys.prefix)")
    assert after["output"].strip().splitlines()[-1] == prefix
    assert kernels_started(host)["renamed"] == renamed_before + 1
    # Reports are authorized like everything else: B cannot set the identity of A's env.
    error = protocol_error_as(host, UID_B, "notebook_saved",
                              {"env": prefix, "file": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4}})
    assert error["code"] == "not_found"
    assert "uid %d does not own an env at %s" % (UID_B, prefix) in error["message"]


# --- issue 9: what a user's %pip may make the daemon do ---------------------------------------------

import base64  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import zipfile  # noqa: E402


def make_wheel(
    directory: Path, name: str, version: str, module_text: str, extra: dict[str, str] | None = None
) -> Path:
    """A minimal pure-Python wheel (module ``name`` with ``module_text``, plus ``extra`` files
    at the top of site-packages), built by hand."""
    module = name.replace("-", "_")
    dist_info = "%s-%s.dist-info" % (module, version)
    files = {
        "%s/__init__.py" % module: module_text,
        "%s/METADATA" % dist_info: "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version),
        "%s/WHEEL" % dist_info: (
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        **(extra or {}),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (path, digest, len(text.encode())))
    record.append("%s/RECORD,," % dist_info)
    files["%s/RECORD" % dist_info] = "\n".join(record) + "\n"
    wheel = directory / ("%s-%s-py3-none-any.whl" % (module, version))
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def make_malicious_sdist(directory: Path, marker: Path, venvs_dir: Path) -> Path:
    """An sdist whose in-tree build backend does what an attacker's would: note who ran it, and
    plant a .pth in every venv it can write (a .pth runs at every interpreter start)."""
    backend = textwrap.dedent('''
        import glob, os
        def _attack():
            with open(%r, "w") as handle:
                handle.write(str(os.getuid()))
            for site in glob.glob(%r + "/*/lib/python*/site-packages"):
                try:
                    with open(os.path.join(site, "zz_evil.pth"), "w") as handle:
                        handle.write("import os; open(%r + '.pth-ran', 'a').write(str(os.getuid()))\\n")
                except OSError:
                    pass
        def get_requires_for_build_wheel(config_settings=None):
            _attack()
            return []
        def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
            _attack()
            raise RuntimeError("done")
        def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
            _attack()
            raise RuntimeError("done")
        ''') % (str(marker), str(venvs_dir), str(marker))
    files = {
        "pyproject.toml": '[project]\nname = "evilpkg"\nversion = "1.0"\n\n[build-system]\nrequires = []\n'
                          'build-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": backend,
        "PKG-INFO": "Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n",
    }
    sdist = directory / "evilpkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo("evilpkg-1.0/" + path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return sdist


def write_simple_index(root: Path, distributions: list[Path]) -> None:
    """A PEP 503 simple index under root/simple for the given files (copied to root/files)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[Path]] = {}
    for dist in distributions:
        shutil.copy(dist, root / "files" / dist.name)
        name = dist.name.split("-")[0].replace("_", "-").lower()
        projects.setdefault(name, []).append(dist)
    for name, dists in projects.items():
        page = root / "simple" / name
        page.mkdir(parents=True, exist_ok=True)
        links = "".join('<a href="../../files/%s#sha256=%s">%s</a>\n'
                        % (d.name, hashlib.sha256(d.read_bytes()).hexdigest(), d.name) for d in dists)
        (page / "index.html").write_text("<!DOCTYPE html><html><body>\n%s</body></html>\n" % links)
    (root / "simple" / "index.html").write_text(
        "<!DOCTYPE html><html><body>%s</body></html>"
        % "".join('<a href="%s/">%s</a>' % (n, n) for n in projects))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)


class IndexServer:
    """``python -m http.server`` on 127.0.0.1 serving a directory: an index someone runs."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
             str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 30, "the local index on port %d" % self.port)
        self.url = "http://127.0.0.1:%d/simple" % self.port

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def attack_files(host: Host) -> Iterator[dict[str, Any]]:
    """A world-writable drop for markers, a malicious sdist behind a local index, a local wheel."""
    base = host.root / "attack"
    drop = base / "drop"
    drop.mkdir(parents=True)
    drop.chmod(0o1777)
    build = base / "build"
    build.mkdir()
    marker = drop / "built-by"
    sdist = make_malicious_sdist(build, marker, host.venvs_dir)
    local_wheel = make_wheel(build, "localpkg", "1.0",
                             "WHERE = 'a file only the daemon should never read for you'\n")
    write_simple_index(base / "index", [sdist, local_wheel])
    subprocess.run(["chmod", "-R", "a+rX", str(build)], check=True)
    server = IndexServer(base / "index")
    try:
        yield {"marker": marker, "index": server.url,
               "sdist_url": "http://127.0.0.1:%d/files/%s" % (server.port, sdist.name),
               "wheel": local_wheel, "file_index": "file://%s/simple" % (base / "index")}
    finally:
        server.stop()


def cache_entries_named(host: Host, needle: str) -> list[str]:
    """Cache entries for a distribution (uv may keep the index page it read; that is no code)."""
    return [str(path) for path in host.cache_dir.rglob("*")
            if needle in path.name and not path.relative_to(host.cache_dir).parts[0].startswith("simple-v")]


def test_a_users_sdist_never_builds_with_the_daemons_rights(host: Host, attack_files: dict[str, Any]) -> None:
    marker = attack_files["marker"]
    env_a = env_of(host, UID_A, "sdist.ipynb")
    requirements = host.home(UID_A) / "sdist-req.txt"
    index = attack_files["index"]
    write_requirements = "printf -- '--index-url %s\\nevilpkg\\n' > %s" % (index, requirements)
    host.run_as(UID_A, ["sh", "-c", write_requirements])
    attempts = {
        "index": (["install", "-i", attack_files["index"], "evilpkg"], 1, "wheels only"),
        "requirements file": (["install", "-r", str(requirements)], 1, "wheels only"),
        "direct URL": (["install", "evilpkg @ " + attack_files["sdist_url"]], 2, "evilpkg needs a build"),
        "VCS": (["install", "evilpkg @ git+http://127.0.0.1:9/evil.git"], 2, "evilpkg needs a build"),
    }
    for what, (argv, status, message) in attempts.items():
        result = host.run_as(UID_A, [env_a + "/bin/pip", *argv])
        last_line = (result.stdout + result.stderr).strip().splitlines()[-1:]
        print("%s: exit %d; %s" % (what, result.returncode, last_line))
        assert not marker.exists(), "%s: the build backend ran as uid %s" % (what, marker.read_text())
        assert result.returncode == status, result.stdout + result.stderr
        assert message in result.stdout + result.stderr
        assert "this shared host installs wheels only" in result.stdout + result.stderr
    assert not list(host.venvs_dir.glob("*/lib/python*/site-packages/zz_evil.pth"))
    assert not list(host.venvs_dir.glob("*/lib/python*/site-packages/evilpkg*"))
    assert cache_entries_named(host, "evilpkg") == [], "the sdist reached the shared cache"


def test_local_paths_hidden_in_urls_and_requirement_files_are_refused(
    host: Host, attack_files: dict[str, Any]
) -> None:
    """Each of these made the daemon read a path a user named (a wheel anyone may read, here)."""
    env_b = env_of(host, UID_B, "paths.ipynb")
    home = host.home(UID_B)
    wheel = attack_files["wheel"]
    nested = home / "nested.txt"
    file_index = attack_files["file_index"]
    texts = {
        "pep508.txt": "localpkg @ file://%s\n" % wheel,
        "index.txt": "--index-url %s\nlocalpkg\n" % file_index,
        "extra.txt": "--extra-index-url=%s\nlocalpkg\n" % file_index,
        "find-links.txt": "--find-links %s\nlocalpkg\n" % wheel.parent,
        "trusted.txt": "--trusted-host 127.0.0.1\nlocalpkg\n",
        "variable.txt": "localpkg @ file://${HOME}/../../../attack/build/%s\n" % wheel.name,
        "continued.txt": "six \\\n--index-url %s\n" % file_index,
        "include.txt": "-r nested.txt\n",
        "editable.txt": "-e git+https://127.0.0.1:9/x.git#egg=x\n",
        "path.txt": "%s\n" % wheel,
    }
    host.run_as(UID_B, ["sh", "-c", "printf -- '-i %s\\nlocalpkg\\n' > %s" % (file_index, nested)])
    for name, text in texts.items():
        (home / name).write_text(text)
        os.chown(home / name, UID_B, UID_B)
    (home / "pins.txt").write_text("localpkg @ file://%s\n" % wheel)
    os.chown(home / "pins.txt", UID_B, UID_B)
    attempts = [
        (["install", "localpkg@file://%s" % wheel], "installing from a local path (localpkg@file://"),
        (["install", "localpkg @ file:%s" % wheel], "installing from a local path (localpkg @ file:"),
        (["install", "localpkg @ %s" % wheel], "installing from a local path"),
        (["install", "-r", "pep508.txt"], "installing from a local path (localpkg @ file://"),
        (["install", "-r", "index.txt"], "requirements line 1: --index-url must be an http(s) URL"),
        (["install", "-r", "extra.txt"], "requirements line 1: --extra-index-url must be an http(s) URL"),
        (["install", "-r", "find-links.txt"], "option --find-links is not supported"),
        (["install", "-r", "trusted.txt"], "option --trusted-host is not supported"),
        (["install", "-r", "variable.txt"], "environment variables are not expanded"),
        (["install", "-r", "continued.txt"], "only --hash=ALGORITHM:DIGEST may follow a requirement"),
        (["install", "-r", "include.txt"], "requirements line 1: -i must be an http(s) URL"),
        (["install", "-r", "editable.txt"], "x needs a build"),
        (["install", "-r", "path.txt"], "installing from a local path"),
        (["install", "six", "-c", "pins.txt"], "installing from a local path (localpkg @ file://"),
    ]
    for argv, message in attempts:
        result = host.run_as(UID_B, [env_b + "/bin/pip", *argv], cwd=home)
        assert result.returncode == 2 and message in result.stderr, (argv, result.stdout + result.stderr)
    # A client that skips the shim and sends the contents itself meets the same checks.
    for text, message in (("localpkg @ file://%s\n" % wheel, "installing from a local path"),
                          ("-i %s\nlocalpkg\n" % file_index, "-i must be an http(s) URL"),
                          ("six\r--index-url %s\n" % file_index, "--index-url must be an http(s) URL"),
                          ("six \\\n  -i=%s\n" % file_index, "only --hash=ALGORITHM:DIGEST may follow"),
                          ("six\u2028-i %s\n" % file_index, "control character")):
        error = protocol_error_as(host, UID_B, "pip",
                                  {"env": env_b, "argv": ["install", "-r", "r.txt"], "files": [text]})
        assert error["code"] in ("bad_request", "not_allowed") and message in error["message"], (text, error)
    assert not list(Path(env_b).glob("lib/python*/site-packages/localpkg*"))


def test_no_user_can_open_the_shared_cache(host: Host) -> None:
    """uv's cache lock file was 0666: flock -x on it stalled every install on the host."""
    assert host.cache_dir.stat().st_mode & 0o777 == 0o700
    lock = host.cache_dir / ".lock"
    assert lock.exists(), "uv made no cache lock: the test no longer looks at the right file"
    verdict = host.python_as(UID_B, """
        import fcntl, json, os, sys
        facts = {}
        lock = lambda: fcntl.flock(open(sys.argv[1], "rb"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for name, action in (("lock", lock), ("list", lambda: os.listdir(sys.argv[2]))):
            try:
                action()
                facts[name] = "allowed"
            except PermissionError:
                facts[name] = "denied"
        print(json.dumps(facts))
        """, str(lock), str(host.cache_dir))
    assert verdict == {"lock": "denied", "list": "denied"}
    # Kernels read the same files through their hardlinks in the venvs.
    result = host.kernel_as(UID_A, "cache.ipynb", "import ipykernel, os; print('imported', os.getuid())")
    assert "imported %d" % UID_A in result["output"], result


def test_no_user_can_lock_another_users_env(host: Host) -> None:
    """uv made each venv's own lock (<venv>/.lock) 0666 at its first install: any user could flock
    it and stall every install into another user's env."""
    result = host.kernel_as(UID_A, "envlock.ipynb", "import sys; print('prefix', sys.prefix)")
    prefix = next(line.split(" ", 1)[1] for line in result["output"].splitlines()
                  if line.startswith("prefix "))
    lock = Path(prefix) / ".lock"
    assert lock.exists(), "uv made no venv lock: the test no longer looks at the right file"
    assert lock.stat().st_mode & 0o777 == 0o600 and lock.stat().st_uid == DAEMON_UID
    verdict = host.python_as(UID_B, """
        import fcntl, json, sys
        try:
            fcntl.flock(open(sys.argv[1], "rb"), fcntl.LOCK_EX | fcntl.LOCK_NB)
            print(json.dumps("allowed"))
        except PermissionError:
            print(json.dumps("denied"))
        """, str(lock))
    assert verdict == "denied"


def test_a_users_index_beats_the_daemons_default_index(host: Host) -> None:
    """UV_DEFAULT_INDEX in the daemon's environment silently beat a user's explicit -i."""
    base = host.root / "precedence"
    servers = []
    for name, version, source in (("a", "1.0", "daemon default"), ("b", "2.0", "user index")):
        (base / name / "build").mkdir(parents=True)
        wheel = make_wheel(base / name / "build", "uvk-i9-probe", version, "SOURCE = %r\n" % source)
        write_simple_index(base / name / "index", [wheel])
        servers.append(IndexServer(base / name / "index"))
    daemon_index, user_index = servers[0].url, servers[1].url
    run = base / "run"
    for directory in (run, base / "state"):
        directory.mkdir(parents=True)
        os.chown(directory, DAEMON_UID, DAEMON_UID)
    sock = run / "d.sock"
    log = open(base / "daemon.log", "wb")
    # The admin's default index is the local one; PyPI (as an extra index) still serves ipykernel.
    daemon = subprocess.Popen(
        [host.python, "-m", "uvkerneld", "--mode", "system", "--socket", str(sock),
         "--state-dir", str(base / "state"), "--cache-dir", str(host.cache_dir),
         "--venvs-dir", str(base / "state" / "venvs"), "--pool-size", "0"],
        user=DAEMON_UID, group=DAEMON_UID, extra_groups=[], cwd="/", stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(host.base_env(), HOME=str(base / "state"), UV_DEFAULT_INDEX=daemon_index,
                 UV_INDEX="https://pypi.org/simple"),
    )
    log.close()
    try:
        wait_until(sock.exists, 60, "the second daemon's socket")

        def as_user(argv: list[str]) -> subprocess.CompletedProcess[str]:
            env = dict(host.user_env(UID_A), UVKERNELD_SOCKET=str(sock))
            return subprocess.run(argv, user=UID_A, group=UID_A, extra_groups=[], env=env,
                                  cwd=str(host.home(UID_A)), capture_output=True, text=True, timeout=600)

        def env_for(notebook: str) -> str:
            result = as_user([host.python, "-c",
                              "import json, sys; from uvkerneld import client; print(client.request("
                              "sys.argv[1], 'acquire', {'key': {'kind': 'notebook', 'value': sys.argv[2]}}, "
                              "600)['path'])",
                              str(sock), str(host.home(UID_A) / notebook)])
            assert result.returncode == 0, result.stdout + result.stderr + (base / "daemon.log").read_text()
            return result.stdout.strip().splitlines()[-1]

        def installed_source(env: str) -> str:
            result = as_user([env + "/bin/python", "-c", "import uvk_i9_probe; print(uvk_i9_probe.SOURCE)"])
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout.strip()

        # Naming no index: the daemon's environment default applies.
        plain = env_for("plain.ipynb")
        result = as_user([plain + "/bin/pip", "install", "uvk-i9-probe"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert installed_source(plain) == "daemon default"
        # The user's -i for their own env wins, on the command line and in a requirements file.
        explicit = env_for("explicit.ipynb")
        result = as_user([explicit + "/bin/pip", "install", "-i", user_index, "uvk-i9-probe"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert installed_source(explicit) == "user index"
        requirements = host.home(UID_A) / "precedence.txt"
        as_user(["sh", "-c",
                 "printf -- '--index-url %s\\nuvk-i9-probe==2.0\\n' > %s" % (user_index, requirements)])
        result = as_user([plain + "/bin/pip", "install", "-r", str(requirements)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert installed_source(plain) == "user index"
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            assert daemon.wait(60) == 0, (base / "daemon.log").read_text()
        finally:
            if daemon.poll() is None:
                daemon.kill()
            for server in servers:
                server.stop()


def test_doctor_as_a_user_looks_past_the_private_cache(host: Host) -> None:
    """The system unit makes the cache's parent 0700 too: a user cannot even stat the cache."""
    private = host.root / "private-cache"
    (private / "uv").mkdir(parents=True, exist_ok=True)
    os.chown(private, DAEMON_UID, DAEMON_UID)
    private.chmod(0o700)
    found = host.python_as(UID_A, """
        import json, sys
        from pathlib import Path
        from uvkerneld.doctor import _existing_parent
        print(json.dumps(str(_existing_parent(Path(sys.argv[1])))))
        """, str(private / "uv"))
    assert found == str(private)  # it exists; what is inside it cannot be looked at


def test_startup_hooks_in_a_users_wheel_never_run_as_the_daemon(
    host: Host, attack_files: dict[str, Any]
) -> None:
    """uv runs an env's own Python (site-packages and all) whenever its interpreter cache misses:
    a wheel's .pth or sitecustomize then ran as the daemon. Wheels are allowed; their hooks are not."""
    drop = attack_files["marker"].parent
    marker = drop / "hook-ran"
    run_hook = "import os; open(%r, 'a').write('%%s:%%d ' %% (__name__, os.getuid()))\n" % str(marker)
    base = host.root / "hooks"
    (base / "build").mkdir(parents=True)
    (drop / "sitecustomize.py").write_text(run_hook)
    wheel = make_wheel(base / "build", "hookpkg", "1.0", "X = 1\n", extra={
        "zz_hookpkg.pth": run_hook, "sitecustomize.py": run_hook, "zz_outside.pth": str(drop) + "\n",
        "zz_inside.pth": "hookpkg\n",
    })
    write_simple_index(base / "index", [wheel])
    server = IndexServer(base / "index")
    try:
        env_b = env_of(host, UID_B, "hooks.ipynb")
        result = host.run_as(UID_B, [env_b + "/bin/pip", "install", "-i", server.url, "hookpkg"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("removed sitecustomize.py, zz_hookpkg.pth, zz_outside.pth from this env: "
                "code that runs at every Python start is not allowed on a shared host") in result.stdout
        site = next(Path(env_b).glob("lib/python*/site-packages"))
        assert sorted(path.name for path in site.glob("*.pth")) == ["zz_inside.pth"]
        assert (site / "hookpkg" / "__init__.py").exists()
        assert_uv_requerying_the_env_runs_no_hook(host, env_b, "hookpkg", marker)
    finally:
        server.stop()


def assert_uv_requerying_the_env_runs_no_hook(host: Host, env: str, package: str, marker: Path) -> None:
    # What a uv upgrade (a new interpreter cache bucket) or `uv cache clean` does: uv queries
    # every env's Python again, as the daemon.
    for bucket in host.cache_dir.glob("interpreter-v*"):
        shutil.rmtree(bucket)
    result = host.run_as(UID_B, [env + "/bin/pip", "list"])
    assert result.returncode == 0 and package in result.stdout, result.stdout + result.stderr
    assert not marker.exists(), "a startup hook ran as the daemon: " + marker.read_text()


def test_a_wheels_pyvenv_cfg_or_pth_folder_with_a_sitecustomize_never_runs_as_the_daemon(
        host: Host, attack_files: dict[str, Any]) -> None:
    """Two bypasses of the startup-hook removal: a wheel's data scheme (the env root) replaced
    pyvenv.cfg with a ``home`` holding the attacker's stdlib and sitecustomize; a .pth that only
    names a folder inside the env put that folder's sitecustomize first on sys.path (this host's
    Debian Python has its own sitecustomize, which masks the second; test_startuphooks covers it)."""
    drop = attack_files["marker"].parent
    marker = drop / "hook-ran"
    run_hook = "import os; open(%r, 'a').write('%%s:%%d ' %% (__name__, os.getuid()))\n" % str(marker)
    fake = drop / "fake"  # a Python home: the real stdlib, entry by entry, plus a sitecustomize
    stdlib = Path(subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip())
    (fake / "bin").mkdir(parents=True)
    (fake / "lib" / stdlib.name).mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name.startswith("sitecustomize"):  # Debian's own: ours replaces it
            continue
        (fake / "lib" / stdlib.name / entry.name).symlink_to(entry)
    (fake / "lib" / stdlib.name / "sitecustomize.py").write_text(run_hook)
    subprocess.run(["chmod", "-R", "a+rX", str(fake)], check=True)
    base = host.root / "hooks2"
    (base / "build").mkdir(parents=True)
    cfg_wheel = make_wheel(base / "build", "cfgpkg", "1.0", "X = 1\n", extra={
        "cfgpkg-1.0.data/data/pyvenv.cfg":
            "home = %s\ninclude-system-site-packages = false\n" % (fake / "bin"),
    })
    pth_wheel = make_wheel(base / "build", "evilpth", "1.0", "X = 1\n", extra={
        "evilpth.pth": "evilpth\n", "evilpth/sitecustomize.py": run_hook,
    })
    write_simple_index(base / "index", [cfg_wheel, pth_wheel])
    server = IndexServer(base / "index")
    try:
        env_b = env_of(host, UID_B, "hooks2.ipynb")
        result = host.run_as(UID_B, [env_b + "/bin/pip", "install", "-i", server.url, "cfgpkg", "evilpth"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "removed evilpth.pth, pyvenv.cfg from this env" in result.stdout, result.stdout
        assert str(fake) not in (Path(env_b) / "pyvenv.cfg").read_text()
        assert_uv_requerying_the_env_runs_no_hook(host, env_b, "evilpth", marker)
    finally:
        server.stop()


# --- notebooks that declare their dependencies (issue 11) ---------------------------------------


def write_notebook_as(host: Host, uid: int, name: str, first_code: str, metadata: dict[str, Any]) -> str:
    """A notebook in the user's home, written by the user (the daemon can read neither)."""
    path = host.home(uid) / name
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {},
                           "outputs": [], "source": first_code}],
                "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}
    result = host.run_as(uid, [host.python, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                               str(path), json.dumps(notebook)])
    assert result.returncode == 0, result.stderr
    return str(path)


def test_a_declaration_is_held_to_pips_rules_on_a_shared_host(
        host: Host, attack_files: dict[str, Any]) -> None:
    """What %pip may not install, a notebook may not declare: local paths, file:// and VCS URLs, a
    file:// index; each refused before uv runs, with %pip's own words, and the env unchanged."""
    wheel = attack_files["wheel"]
    notebook = str(host.home(UID_A) / "declared-paths.ipynb")
    env = env_of(host, UID_A, "declared-paths.ipynb")
    before = sorted(os.listdir(next(Path(env).glob("lib/python*/site-packages"))))
    refused = {
        "localpkg @ file://%s" % wheel: "installing from a local path (localpkg @ file://",
        "localpkg @ %s" % wheel: "installing from a local path (localpkg @ /",
        "evilpkg @ git+http://127.0.0.1:9/evil.git": "evilpkg needs a build",
        "evilpkg @ " + attack_files["sdist_url"]: "evilpkg needs a build",
    }
    for requirement, message in refused.items():
        declaration = {"uv": {"dependencies": [requirement]}, "uv_key": "metadata.runt.uv"}
        error = protocol_error_as(host, UID_A, "sync", {
            "key": {"kind": "notebook", "value": notebook}, "declaration": declaration})
        assert error["code"] == "bad_declaration", error
        assert error["message"].startswith("metadata.runt.uv.dependencies[0]: "), error
        assert message in error["message"], error
    script = ('# /// script\n# dependencies = ["localpkg"]\n# [tool.uv]\n# index-url = "%s"\n# ///\n'
              % attack_files["file_index"])
    error = protocol_error_as(host, UID_A, "sync", {
        "key": {"kind": "notebook", "value": notebook}, "declaration": {"script": script, "script_cell": 1}})
    assert error["code"] == "bad_declaration", error
    assert "cell 1 (PEP 723 block): [tool.uv] index-url: URL must be an http(s) URL, got 'file://" \
        in error["message"]
    # A lock naming a file on the host (uv checking it would read that path as the daemon).
    lock = ('version = 1\nrequires-python = ">=3.8"\n\n[manifest]\nrequirements = [{ name = "localpkg" }]\n\n'
            '[[package]]\nname = "localpkg"\nversion = "1.0"\nsource = { path = "%s" }\n' % wheel)
    script = '# /// script\n# dependencies = ["localpkg"]\n# ///\n'
    error = protocol_error_as(host, UID_A, "sync", {
        "key": {"kind": "notebook", "value": notebook},
        "declaration": {"script": script, "script_cell": 1, "lock": lock}})
    assert error["code"] == "bad_declaration", error
    assert error["message"].startswith(
        'metadata "uv.lock": installing from a local path (localpkg from path /'), error
    assert sorted(os.listdir(next(Path(env).glob("lib/python*/site-packages")))) == before


def test_a_declared_sdist_is_never_built_on_a_shared_host(
        host: Host, attack_files: dict[str, Any]) -> None:
    """A notebook that declares a package the index has only as an sdist, opened in a real kernel:
    the notebook shows why (wheels only), and the build backend never ran."""
    marker = attack_files["marker"]
    # An extra index: the kernel's own packages still come from the default one.
    script = ('# /// script\n# dependencies = ["evilpkg"]\n# [tool.uv]\n# extra-index-url = ["%s"]\n# ///\n'
              % attack_files["index"])
    write_notebook_as(host, UID_A, "declared-sdist.ipynb", script, {})
    outcome = host.kernel_as(UID_A, "declared-sdist.ipynb", "import sys; print(sys.prefix)")
    assert outcome["status"] == "error", outcome
    assert "cell 1 (PEP 723 block): 'evilpkg' does not resolve" in outcome["output"], outcome
    assert "this shared host installs wheels only" in outcome["output"], outcome["output"]
    assert not marker.exists(), "the build backend ran as uid %s" % marker.read_text()
    assert not list(host.venvs_dir.glob("*/lib/python*/site-packages/zz_evil.pth"))
    assert cache_entries_named(host, "evilpkg") == [], "the sdist reached the shared cache"


def test_a_declared_wheel_is_installed_for_its_user_on_a_shared_host(host: Host) -> None:
    """The same notebook format on a shared host: the kernel, running as its user, imports it."""
    write_notebook_as(host, UID_B, "declared.ipynb", "print(1)",
                      {"runt": {"schema_version": "1", "uv": {"dependencies": ["iniconfig==1.1.1"]}}})
    outcome = host.kernel_as(UID_B, "declared.ipynb",
                             "import importlib.metadata as m, os; print(m.version('iniconfig'), os.getuid())")
    assert outcome == {"status": "ok", "output": "1.1.1 %d\n" % UID_B}, outcome
