"""A real etcd + kube-apiserver for tests, the layout controller-runtime's envtest uses.

The binaries come from $KUBEBUILDER_ASSETS (a folder with `etcd` and `kube-apiserver`, as
`setup-envtest` installs them), else from ../shared/envtest/bin beside the repository.
Certificates are made here (cryptography), so nothing but the two binaries is needed;
the API server can be restarted alone, keeping etcd, its certificates and its signing
key (tokens stay valid), as a control-plane upgrade would.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED_ASSETS = ROOT.parent / "shared" / "envtest" / "bin"


def assets() -> tuple[Path | None, str]:
    """The folder holding etcd and kube-apiserver, or None and why there is none."""
    configured = os.environ.get("KUBEBUILDER_ASSETS")
    folder = Path(configured) if configured else SHARED_ASSETS
    missing = [b for b in ("etcd", "kube-apiserver") if not os.access(folder / b, os.X_OK)]
    if not missing:
        return folder, ""
    where = (
        f"KUBEBUILDER_ASSETS={configured}" if configured else f"{SHARED_ASSETS} (KUBEBUILDER_ASSETS unset)"
    )
    return None, f"no {' and no '.join(missing)} in {where}: set KUBEBUILDER_ASSETS to run envtest tests"


def _pem_key(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return data


def _certificate(
    subject: str, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False, server: bool = False
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(tz=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class ApiServer:
    """etcd and kube-apiserver in a temporary folder; `admin_token` is in system:masters."""

    def __init__(self, binaries: Path, authorization: str = "RBAC") -> None:
        self.binaries = binaries
        self.authorization = authorization
        self.dir = Path(tempfile.mkdtemp(prefix="bilayer-envtest-"))
        self.port = free_port()
        self.etcd_port = free_port()
        self.admin_token = secrets.token_hex(24)
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self._pki()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    def _pki(self) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("bilayer-envtest-ca", ca_key, None, ca=True)
        serving_key = ec.generate_private_key(ec.SECP256R1())
        serving = _certificate("kube-apiserver", serving_key, (ca.subject, ca_key), server=True)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files = {
            "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
            "serving.crt": serving.public_bytes(serialization.Encoding.PEM),
            "serving.key": _pem_key(serving_key),
            "sa.key": _pem_key(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "tokens.csv": f"{self.admin_token},envtest-admin,envtest-admin,system:masters\n".encode(),
        }
        for name, data in files.items():
            (self.dir / name).write_bytes(data)
            (self.dir / name).chmod(0o600)

    def start(self) -> ApiServer:
        peer = free_port()
        self.etcd = subprocess.Popen(
            [
                str(self.binaries / "etcd"),
                "--name=envtest",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=envtest=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            stdout=(self.dir / "etcd.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.start_apiserver()
        return self

    def start_apiserver(self) -> None:
        d = self.dir
        self.apiserver = subprocess.Popen(
            [
                str(self.binaries / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={d / 'apiserver-certs'}",
                f"--tls-cert-file={d / 'serving.crt'}",
                f"--tls-private-key-file={d / 'serving.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                f"--authorization-mode={self.authorization}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                # No controller-manager creates default service accounts (see the README).
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
            stdout=(d / "kube-apiserver.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.apiserver.poll() is not None or (self.etcd and self.etcd.poll() is not None):
                raise RuntimeError(f"the API server exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API server was not ready in 60 s: {self.log_tail()}")
            time.sleep(0.1)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (SIGKILL: as a crashed or replaced control plane)."""
        if self.apiserver is not None:
            self.apiserver.send_signal(signal.SIGKILL)
            self.apiserver.wait(30)
            self.apiserver = None

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "kube-apiserver.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        request = urllib.request.Request(
            self.url + "/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        self.stop_apiserver()
        if self.etcd is not None:
            self.etcd.terminate()
            try:
                self.etcd.wait(20)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
            self.etcd = None
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    def kubeconfig(self, path: Path, *, token: str | None = None, token_file: Path | None = None) -> Path:
        """A kubeconfig for this server: the given token (or token file), else admin's."""
        user: dict[str, Any] = {"tokenFile": str(token_file)} if token_file else {}
        if not token_file:
            user["token"] = token or self.admin_token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "envtest",
            "clusters": [
                {
                    "name": "envtest",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "envtest", "user": user}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "envtest"}}],
        }
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path
