"""Find, start and stop a local Triton Inference Server on loopback. Standard library only.

Where the binary comes from, in order: ``EDGEMM_TRITONSERVER`` (a tritonserver binary whose
``../backends`` holds the python backend, as in NVIDIA's containers), ``tritonserver`` on PATH with the
same layout, or the ``nvidia-pytriton`` wheel (``pip install --no-deps nvidia-pytriton``), which ships
tritonserver 2.51 with the python backend but keeps the backend's stub per Python version apart. For the
wheel, a backends folder is assembled in a folder the caller owns (``workdir``): the python backend's files
and the stub for this Python, copied. Nothing in site-packages is changed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import DependencyError, InputError

LOOPBACK = "127.0.0.1"
INSTALL_FIX = "pip install --no-deps nvidia-pytriton (see README, Serving), or run in NVIDIA's Triton container"
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path | None      # a complete backends folder (containers); None: assemble one (wheel)
    python_backend: Path | None = None   # the wheel's python backend (libtriton_python.so, utils)
    stub: Path | None = None             # the wheel's stub for this Python
    libs: Path | None = None             # the wheel's bundled shared libraries


def find_tritonserver() -> TritonInstall | None:
    """The local Triton server, or None when there is none (see the module docstring for the order)."""
    for candidate in (os.environ.get("EDGEMM_TRITONSERVER"), shutil.which("tritonserver")):
        if candidate:
            binary = Path(candidate)
            backends = binary.resolve().parent.parent / "backends"
            if binary.is_file() and (backends / "python" / STUB).is_file():
                return TritonInstall(binary, backends)
    try:
        spec = importlib.util.find_spec("pytriton")  # located, not imported (it needs numpy<2)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    python_backend = root / "backends" / "python"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / STUB
    if not (binary.is_file() and (python_backend / "libtriton_python.so").is_file() and stub.is_file()):
        return None
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, None, python_backend, stub, libs if libs.is_dir() else None)


def require_tritonserver() -> TritonInstall:
    install = find_tritonserver()
    if install is None:
        raise DependencyError("no tritonserver with the python backend for Python "
                              f"{sys.version_info.major}.{sys.version_info.minor} was found", fix=INSTALL_FIX)
    return install


def prepare_backends(install: TritonInstall, workdir: Path) -> Path:
    """The backends folder to pass to the server: the container's own, or one assembled in ``workdir``."""
    if install.backends is not None:
        return install.backends
    target = Path(workdir) / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (install.python_backend / "libtriton_python.so",
                   install.python_backend / "triton_python_backend_utils.py", install.stub):
        shutil.copy2(source, target / source.name)
    return target.parent


def free_ports(count: int) -> list[int]:
    """``count`` ports nothing listens on now, picked by the OS while all are bound at once (ports picked
    one by one may repeat). The server binds them a moment later, so another process may take one first:
    ``TritonServer.start`` then picks again."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


PORT_TAKEN = "already in use"   # tritonserver's log when its HTTP or GRPC port is taken
PORT_TRIES = 3


def _this_libpython_dir() -> str | None:
    """The folder of this interpreter's shared libpython, when it has one. The stub links whatever
    libpython3.X the loader finds first (here the system's 3.11.2) while its stdlib and packages come from
    this environment (pyenv 3.11.7): their C extensions then miss symbols (_ssl: undefined _PyModule...,
    so model-signing cannot load). The same libpython as the packages avoids that."""
    import sysconfig

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname and (Path(libdir) / soname).is_file():
        return libdir
    return None


class TritonServer:
    """A tritonserver process serving ``repository`` on 127.0.0.1 only. Use as a context manager, or
    ``start()`` / ``stop()``. ``exit_on_error=False`` keeps the server up when a model fails to load
    (its state and reason are in ``models()``)."""

    def __init__(self, repository: os.PathLike, *, workdir: os.PathLike, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, exit_on_error: bool = True,
                 env: dict | None = None, install: TritonInstall | None = None):
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.install = install or require_tritonserver()
        self._asked_ports = (http_port, grpc_port, metrics_port)
        self._pick_ports()
        self.exit_on_error = exit_on_error
        self.extra_env = dict(env or {})
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={backends}",
                f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
                f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}",
                f"--exit-on-error={'true' if self.exit_on_error else 'false'}",
                "--strict-readiness=true", "--disable-auto-complete-config"]

    def environment(self) -> dict:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.install.libs) if self.install.libs else None,
                                                               _this_libpython_dir(), env.get("LD_LIBRARY_PATH")]))
        # The python backend's stub embeds a Python that finds its prefix through the first `python3` on
        # PATH: this interpreter's folder first, so the stub sees this environment's packages.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # ...and this edgemm (a checkout not installed in the environment included).
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        env.update(self.extra_env)
        return env

    def _pick_ports(self) -> None:
        picked = iter(free_ports(3))
        self.http_port, self.grpc_port, self.metrics_port = (port or next(picked) for port in self._asked_ports)
        self._picked = {p for p, asked in zip((self.http_port, self.grpc_port, self.metrics_port),
                                              self._asked_ports) if not asked}

    def _picked_port_taken(self) -> bool:
        error = self.last_error()
        return PORT_TAKEN in error and any(f":{port}'" in error for port in self._picked)

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Start and wait (at most ``timeout`` seconds) until the server answers and every model has
        finished loading; a server that exits or stays silent is stopped and reported in one line. A port
        edgemm picked that another process took meanwhile is picked again (a port the caller gave is not)."""
        if not self.repository.is_dir():
            raise InputError("is not a folder", file=self.repository, fix="pass a model repository folder")
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.install, self.workdir)   # once: a retry's stub may still be running
        tries = 1
        while True:
            try:
                return self._start(backends, timeout)
            except DependencyError:
                if tries == PORT_TRIES or not self._picked_port_taken():
                    raise
                tries += 1
                self._pick_ports()

    def _start(self, backends: Path, timeout: float) -> "TritonServer":
        log = open(self.log_path, "wb")
        try:
            # A session of its own: Ctrl-C in a terminal reaches edgemm, which stops the server in order.
            self.process = subprocess.Popen(self.command(backends), env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise DependencyError(f"tritonserver exited with status {self.process.returncode}: "
                                          f"{self.last_error()}", file=self.log_path,
                                          fix="read the server log named here")
                if self._get("/v2/health/live") == 200 and self._loaded():
                    return self
                if time.monotonic() > deadline:
                    raise DependencyError(f"tritonserver was not ready within {timeout:.0f} s", file=self.log_path,
                                          fix="read the server log named here")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def _loaded(self) -> bool:
        return all(m.get("state") in ("READY", "UNAVAILABLE") for m in self.models())

    def _get(self, path: str, method: str = "GET", body: bytes | None = None) -> int:
        return self.request(path, method, body)[0]

    def request(self, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0):
        """(status, body bytes) of an HTTP request to the server; status 0 when it does not answer."""
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def models(self) -> list[dict]:
        """The repository index: name, version, state (READY, UNAVAILABLE, LOADING...) and reason."""
        status, body = self.request("/v2/repository/index", "POST", b"{}")
        if status != 200:
            return [{"state": "UNKNOWN"}]
        try:
            return json.loads(body)
        except ValueError:
            return [{"state": "UNKNOWN"}]

    def ready(self, model: str) -> bool:
        return self._get(f"/v2/models/{model}/ready") == 200

    def statistics(self, model: str) -> dict:
        status, body = self.request(f"/v2/models/{model}/stats")
        if status != 200:
            raise DependencyError(f"statistics for {model!r}: HTTP {status}", file=self.log_path)
        return json.loads(body)["model_stats"][0]

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return resp.read().decode("utf-8", "replace")

    def last_error(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in lines if line.startswith("E") or "error" in line.lower()]
        return (errors or lines or ["(empty log)"])[-1].strip()[:300]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after ``timeout`` seconds."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # The python backend's stubs are children of the server; it ends them, a SIGKILL does not.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TritonServer":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
