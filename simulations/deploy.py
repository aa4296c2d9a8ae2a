"""Run the FedShare Flower app as a real deployment on this machine, over TLS with authenticated
SuperNodes, and stop everything it started.

A simulation (:mod:`simulations.flower_runner`) runs virtual nodes inside one SuperLink; here
every SuperNode is its own ``flower-supernode`` process that connects to the SuperLink's Fleet
API over HTTPS (checked against our own CA) and proves who it is with an EC key whose public
half was registered beforehand (``--enable-supernode-auth``). The steps are those of a
deployment on real machines; only the addresses are loopback ones:

1. :func:`make_credentials`: a CA, the SuperLink's server certificate (SAN ``localhost``,
   ``127.0.0.1``, ``::1``) and one OpenSSH EC key pair per SuperNode, with ``cryptography``;
2. :class:`Deployment`: a SuperLink on a free port (Flower 1.42 serves the Fleet, Control and
   Runtime APIs over one HTTPS port), a private ``FLWR_HOME`` whose ``config.toml`` names the
   connection :data:`CONNECTION`, ``flwr supernode register`` for every public key, one
   SuperNode per node config, then ``flwr run`` of this repository;
3. :func:`deploy`: all of it for one run, as ``fedshare deploy`` does.

Every process the deployment starts (and every process those start: the SuperLink's SuperExec
and ServerApp, the SuperNodes' SuperExecs and ClientApps, the ``flwr`` CLI calls) carries the
environment variable :data:`MARKER` with a value of its own, so :meth:`Deployment.stop` finds
and stops them even when Flower detached them into sessions of their own or their parent died.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshare.errors import FedShareError
from simulations.flower_runner import REPO_ROOT, _free_port, flower_env, toml_value, write_toml

CONNECTION = "fedshare-tls"
MARKER = "FEDSHARE_DEPLOYMENT"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
NodeConfig = Mapping[str, str | int | float | bool]
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
TIMED_OUT = 124  # what run() returns when the run outlived its timeout (as coreutils timeout)


def _bin(name: str) -> str:
    """A Flower command of this interpreter's environment (never one found elsewhere on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedShareError(f"{name} not found beside {sys.executable}; install the project")
    return str(path)


# ------------------------------------------------------------------------------ credentials
@dataclass(frozen=True)
class Credentials:
    """Where the deployment's TLS and SuperNode-authentication files lie (absolute paths)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # OpenSSH private keys, mode 0600
    node_public_keys: list[Path]  # their OpenSSH public keys (what the SuperLink registers)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to a file created with ``mode`` (never readable by others in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through os.open
    return path.resolve()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedShare"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries: IP addresses as IPAddress, everything else as DNSName."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, days: int,
                 extensions: Sequence[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    """A certificate with the key identifiers strict verifiers (OpenSSL 3, Python 3.13) want."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_credentials(directory: Path, num_nodes: int, hosts: Sequence[str] = LOCAL_HOSTS,
                     days: int = 30) -> Credentials:
    """A fresh CA, a SuperLink server certificate for ``hosts`` and ``num_nodes`` SuperNode
    key pairs in ``directory`` (created; existing files are replaced).

    The SuperNodes, the ``flwr`` CLI and the SuperLink's own ServerApp launcher all check the
    SuperLink's certificate against the CA, so its SAN must name every address they dial (on
    one machine: ``localhost``, ``127.0.0.1``, ``::1``; on real machines pass the SuperLink's
    DNS name or IP). SuperNode keys are EC on SECP384R1 in OpenSSH format, unencrypted, which
    is what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    read.
    """
    if num_nodes < 0:
        raise FedShareError(f"num_nodes must be >= 0, not {num_nodes}")
    directory.mkdir(parents=True, exist_ok=True)
    curve = ec.SECP384R1()
    ca_key = ec.generate_private_key(curve)
    ca_name = _name("FedShare deployment CA")
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, days, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=True, crl_sign=True, encipher_only=False,
                       decipher_only=False), True)])
    server_key = ec.generate_private_key(curve)
    server = _certificate(_name(hosts[0] if hosts else "superlink"), server_key, ca_name, ca_key,
                          days, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=False, crl_sign=False, encipher_only=False,
                       decipher_only=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(_alt_names(hosts)), False)])
    pem = serialization.Encoding.PEM
    node_keys, node_public_keys = [], []
    for i in range(num_nodes):
        key = ec.generate_private_key(curve)
        node_keys.append(_write(directory / f"supernode-{i}.key", key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), 0o600))
        node_public_keys.append(_write(directory / f"supernode-{i}.key.pub", key.public_key()
                                       .public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)))
    return Credentials(ca_cert=_write(directory / "ca.crt", ca.public_bytes(pem)),
                       server_cert=_write(directory / "server.pem", server.public_bytes(pem)),
                       server_key=_write(directory / "server.key", _pem_key(server_key), 0o600),
                       node_keys=node_keys, node_public_keys=node_public_keys)


# ------------------------------------------------------------------------------ node config
def render_node_config(config: NodeConfig) -> str:
    """Flower's ``--node-config`` syntax (``key=1 key2="text"``).

    Flower splits the string with ``key=("..."|'...'|\\S+)``, so a string value may hold spaces
    but no double quote or line break: those are refused here rather than mangled there.
    """
    parts = []
    for key, value in config.items():
        if not _KEY.match(key):
            raise FedShareError(f"bad node-config key {key!r} (letters, digits, _ . - only)")
        if isinstance(value, str) and ('"' in value or "\n" in value or "\r" in value):
            raise FedShareError(f"node-config value of {key} holds a quote or a line break")
        parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


# ------------------------------------------------------------------------------ processes
def _group_signal(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal a process started with ``start_new_session`` and everything in its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the group (Flower's graceful exit), SIGKILL it after ``timeout``; reap the
    leader. Members that outlive it are left to the marker sweep of :meth:`Deployment.stop`
    (signalling the group of a leader reaped earlier could hit a reused process group id)."""
    if process.poll() is not None:
        return
    _group_signal(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _group_signal(process, signal.SIGKILL)
        process.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _is_command(process: psutil.Process, name: str) -> bool:
    """Whether ``process`` runs Flower's console script ``name`` (``python .../name ...``)."""
    try:
        return any(Path(arg).name == name for arg in process.cmdline()[:2])
    except psutil.Error:
        return False


def _live(process: psutil.Process) -> bool:
    """Running, not a zombie (Flower's SuperExecs reap their apps only now and then)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Deployment:
    """A SuperLink and one authenticated SuperNode per node config on this machine, over TLS.

    Use it as a context manager: entering starts everything and waits until every SuperNode is
    online; leaving (or a failure halfway through starting) stops every process it started.
    Logs: ``work_dir/superlink.log`` (also the ServerApp's output) and
    ``work_dir/supernode-<i>.log`` (also its ClientApps' output).
    """

    def __init__(self, work_dir: Path, credentials: Credentials,
                 node_configs: Sequence[NodeConfig], *, startup_timeout: float = 120.0,
                 max_retries: int = 10) -> None:
        if len(node_configs) > len(credentials.node_keys):
            raise FedShareError(f"{len(node_configs)} node configs but only "
                                f"{len(credentials.node_keys)} SuperNode keys")
        self.work_dir = work_dir.resolve()
        self.credentials = credentials
        self.node_configs = [dict(config) for config in node_configs]
        for config in node_configs:
            render_node_config(config)  # a bad node config fails before anything starts
        self.startup_timeout = startup_timeout
        self.max_retries = max_retries
        self.home = self.work_dir / "flwr-home"
        self.env = flower_env(self.home)
        self.env[MARKER] = uuid.uuid4().hex
        self.port = 0
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self._runs: list[subprocess.Popen[bytes]] = []

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register the keys, start the SuperNodes and wait for them.

        Anything that fails (or an interrupt) stops what was already started before raising.
        """
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.home.mkdir(parents=True, exist_ok=True)
            self._start_superlink()
            self._write_connection()
            for i, public_key in enumerate(self.credentials.node_public_keys[
                    :len(self.node_configs)]):
                self._flwr("supernode", "register", str(public_key), CONNECTION,
                           "--name", f"fedshare-{i}")
            for i in range(len(self.node_configs)):
                self.supernodes.append(self._start_supernode(i))
            self._wait_for_nodes()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process of the deployment: runs, SuperNodes (and their ClientApps), then
        the SuperLink (and its SuperExec and ServerApp), then anything else carrying our marker.
        Safe to call more than once."""
        for process in [*self._runs, *self.supernodes]:
            _stop_group(process, timeout)
        if self.superlink is not None:
            detached = _descendants(self.superlink.pid)  # its SuperExec leaves our group
            _stop_group(self.superlink, timeout)
            self._end(detached, timeout)
        self._end(self.processes(), timeout)

    @staticmethod
    def _end(processes: list[psutil.Process], timeout: float) -> None:
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=timeout)

    # ---------------------------------------------------------------- SuperLink
    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink with its SuperExec and ServerApp, as when its machine dies."""
        if self.superlink is None:
            return
        detached = _descendants(self.superlink.pid)
        if self.superlink.poll() is None:
            _group_signal(self.superlink, signal.SIGKILL)
        for process in detached:
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.superlink.wait()
        psutil.wait_procs(detached, timeout=10)

    def restart_superlink(self) -> None:
        """Start the SuperLink again on its port and database: registrations and runs survive,
        and the SuperNodes reconnect by themselves (Flower's backoff: about 20-30 s)."""
        self._start_superlink(fresh=False)
        self._wait_for_nodes()

    def _start_superlink(self, fresh: bool = True) -> None:
        database = self.work_dir / "superlink.db"
        if fresh:
            database.unlink(missing_ok=True)  # a deployment of its own: no stale runs or keys
            self.port = _free_port()
        credentials = self.credentials
        command = [_bin("flower-superlink"),
                   "--ssl-ca-certfile", str(credentials.ca_cert.resolve()),
                   "--ssl-certfile", str(credentials.server_cert.resolve()),
                   "--ssl-keyfile", str(credentials.server_key.resolve()),
                   "--enable-supernode-auth", "--database", str(database),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        log = self.work_dir / ("superlink.log" if fresh else "superlink-restarted.log")
        self.superlink = self._popen(command, log)
        deadline = time.monotonic() + self.startup_timeout
        context = ssl.create_default_context(cafile=str(credentials.ca_cert))
        while not self._healthy(context):
            if self.superlink.poll() is not None:
                raise FedShareError(f"the SuperLink exited with status {self.superlink.returncode}"
                                    f"; see {log}")
            if time.monotonic() > deadline:
                raise FedShareError(f"the SuperLink was not ready in {self.startup_timeout:.0f} s;"
                                    f" see {log}")
            time.sleep(0.3)

    def _healthy(self, context: ssl.SSLContext) -> bool:
        """Whether the SuperLink answers on HTTPS with a certificate our CA vouches for."""
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", timeout=2,
                                        context=context) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def address(self) -> str:
        """The SuperLink's Fleet/Control/Runtime API address (one port since Flower 1.40)."""
        return f"127.0.0.1:{self.port}"

    def _write_connection(self) -> None:
        """``$FLWR_HOME/config.toml`` with the TLS connection the ``flwr`` CLI uses."""
        ca = str(self.credentials.ca_cert.resolve())  # flwr rejects relative paths
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {toml_value(self.address)}\nroot-certificates = {toml_value(ca)}\n")

    # ---------------------------------------------------------------- SuperNodes
    def supernode_command(self, private_key: Path, node_config: NodeConfig,
                          max_retries: int | None = None) -> list[str]:
        """The ``flower-supernode`` command line of a node with ``private_key`` (its public key
        must be registered) on a free Runtime API port; run it with :attr:`env`."""
        retries = self.max_retries if max_retries is None else max_retries
        return [_bin("flower-supernode"), "--superlink", self.address,
                "--root-certificates", str(self.credentials.ca_cert.resolve()),
                "--auth-supernode-private-key", str(private_key.resolve()),
                "--port", str(_free_port()), "--node-config", render_node_config(node_config),
                "--max-retries", str(retries)]

    def _start_supernode(self, i: int) -> subprocess.Popen[bytes]:
        command = self.supernode_command(self.credentials.node_keys[i], self.node_configs[i])
        return self._popen(command, self.work_dir / f"supernode-{i}.log")

    def online_nodes(self) -> int:
        """How many registered SuperNodes the SuperLink sees online."""
        listing = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        return sum(node.get("status") == "online" for node in _json(listing)["nodes"])

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while self.online_nodes() < len(self.supernodes):
            for i, node in enumerate(self.supernodes):
                if node.poll() is not None:
                    raise FedShareError(f"SuperNode {i} exited with status {node.returncode}; "
                                        f"see {self.work_dir / f'supernode-{i}.log'}")
            if time.monotonic() > deadline:
                raise FedShareError(f"not every SuperNode was online after "
                                    f"{self.startup_timeout:.0f} s; see {self.work_dir}")
            time.sleep(1.0)

    def supernode_pids(self) -> list[int]:
        """The ``flower-supernode`` process of every node, by node index."""
        return [node.pid for node in self.supernodes]

    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``i`` and its process group (its SuperExec and ClientApps),
        as when its machine dies. The deployment's stop() reaps it."""
        if self.supernodes[i].poll() is None:  # never the group id of a reaped process
            _group_signal(self.supernodes[i], sig)

    # ---------------------------------------------------------------- runs
    def start_run(self, run_config: Mapping[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
        """Start ``flwr run`` of this repository with ``run_config`` (keys of
        ``[tool.flwr.app.config]``), streaming the run's logs into ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        overrides = self.work_dir / f"run-config-{len(self._runs)}.toml"
        write_toml(overrides, run_config)
        command = [_bin("flwr"), "run", str(REPO_ROOT), CONNECTION, "--run-config",
                   str(overrides), "--stream"]
        process = self._popen(command, log_path, cwd=REPO_ROOT)
        self._runs.append(process)
        return process

    def run(self, run_config: Mapping[str, Any], log_path: Path, timeout: float) -> int:
        """Run the app once and return its exit status: 0 only when the SuperLink reports the
        run ``finished:completed`` (``flwr run --stream`` exits 0 even for a failed run), else
        ``flwr run``'s own non-zero status, 1 for a failed or stopped run, or
        :data:`TIMED_OUT` after ``timeout`` seconds (the run is then stopped)."""
        process = self.start_run(run_config, log_path)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(process, 10.0)
            if (run_id := started_run_id(log_path)) is not None:
                with contextlib.suppress(FedShareError):
                    self._flwr("stop", str(run_id), CONNECTION, check=False)
            _note(log_path, f"fedshare deploy: the run outlived its {timeout:.0f} s timeout")
            return TIMED_OUT
        if code != 0:
            return code
        try:
            status = self.run_status(started_run_id(log_path))
        except FedShareError as error:  # e.g. the SuperLink is gone: the caller decides
            status = f"unknown ({error})"
        if status != "finished:completed":
            _note(log_path, f"fedshare deploy: the SuperLink reports the run as {status}")
            return 1
        return 0

    def run_status(self, run_id: int | None, wait: float = 15.0) -> str:
        """The SuperLink's status of run ``run_id`` (``finished:completed`` on success), waiting
        up to ``wait`` seconds for it to be finished."""
        if run_id is None:
            return "unknown (no run was started)"
        deadline = time.monotonic() + wait
        while True:
            runs = _json(self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format",
                                    "json"))["runs"]
            status = str(runs[0]["status"]) if runs else "unknown"
            if status.startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(0.5)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop run ``run_id`` (``flwr stop``), e.g. after its ServerApp
        died; a run that already finished is left as it is."""
        self._flwr("stop", str(run_id), CONNECTION, check=False)

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes (``flwr-serverapp``) the SuperLink's SuperExec launched."""
        if self.superlink is None:
            return []
        return [p.pid for p in _descendants(self.superlink.pid)
                if _is_command(p, "flwr-serverapp") and _live(p)]

    def processes(self) -> list[psutil.Process]:
        """Every live process of this deployment (zombies aside), found by :data:`MARKER` in
        its environment."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if (process.pid != os.getpid() and _live(process)
                        and process.environ().get(MARKER) == self.env[MARKER]):
                    found.append(process)
        return found

    # ---------------------------------------------------------------- helpers
    def _popen(self, command: list[str], log_path: Path, cwd: Path | None = None
               ) -> subprocess.Popen[bytes]:
        """Start ``command`` in a session of its own (so its group can be signalled) with its
        output in ``log_path``."""
        with open(log_path, "wb") as log:
            return subprocess.Popen(command, env=self.env, cwd=cwd or self.work_dir, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def _flwr(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run a ``flwr`` CLI command against this deployment; its output, or FedShareError."""
        try:
            done = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.work_dir,
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise FedShareError(f"flwr {' '.join(args)} took over {timeout:.0f} s") from None
        if check and done.returncode != 0:
            raise FedShareError(f"flwr {' '.join(args)} failed with status {done.returncode}: "
                                f"{(done.stdout + done.stderr).strip()[-500:]}")
        return done.stdout


def _json(output: str) -> dict[str, Any]:
    """The (indented) JSON object a ``flwr ... --format json`` command printed last."""
    starts = [m.start() for m in re.finditer(r"^\{", output, re.MULTILINE)]
    for start in reversed(starts):
        with contextlib.suppress(json.JSONDecodeError):
            return dict(json.JSONDecoder().raw_decode(output, start)[0])
    raise FedShareError(f"no JSON in the output of flwr: {output.strip()[-300:]}")


def started_run_id(log_path: Path) -> int | None:
    """The run id ``flwr run`` reported in ``log_path`` (``None`` if it started none)."""
    match = _STARTED_RUN.search(log_path.read_text(errors="replace"))
    return int(match[1]) if match else None


def _note(log_path: Path, line: str) -> None:
    with open(log_path, "a") as log:
        log.write(line + "\n")


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI timeout, a closed terminal) interrupt like Ctrl-C, so the
    deployment's processes, which run in sessions of their own, are stopped too."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------ entry point
def deploy(work_dir: Path, node_configs: Sequence[NodeConfig], run_config: Mapping[str, Any],
           timeout: float, out: IO[str] | None = None) -> Path:
    """Deploy the app on this machine (one SuperNode per entry of ``node_configs``, e.g. from
    the per-device data files), run it once with ``run_config`` and stop everything.

    Returns the run's out-dir (``run_config["out-dir"]``, default ``work_dir/run``); raises
    :class:`FedShareError` when the run fails. ``num-nodes`` defaults to the node count.
    """
    if not node_configs:
        raise FedShareError("a deployment needs at least one node config")
    work_dir = work_dir.resolve()
    out_dir = Path(str(run_config.get("out-dir") or work_dir / "run")).resolve()
    if (out_dir / "state.db").exists() or (out_dir / "summary.json").exists():
        raise FedShareError(f"{out_dir} already holds a run; choose another out-dir")
    settings = {"num-nodes": len(node_configs), **run_config, "out-dir": str(out_dir)}
    work_dir.mkdir(parents=True, exist_ok=True)
    credentials_dir = work_dir / "credentials"
    shutil.rmtree(credentials_dir, ignore_errors=True)
    credentials = make_credentials(credentials_dir, len(node_configs))
    log_path = work_dir / "run.log"
    print(f"deployment in {work_dir}: logs superlink.log, supernode-<i>.log, run.log; "
          f"credentials in {credentials_dir}", file=out or sys.stdout, flush=True)
    with _signals_interrupt(), Deployment(work_dir, credentials, node_configs) as deployment:
        code = deployment.run(settings, log_path, timeout)
    if code != 0:
        raise FedShareError(f"the deployed run failed (status {code}); see {log_path} and "
                            f"{work_dir / 'superlink.log'}")
    if not (out_dir / "summary.json").exists():
        raise FedShareError(f"the run finished without {out_dir / 'summary.json'}; see {log_path}")
    return out_dir
