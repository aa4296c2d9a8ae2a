"""The credentials of a TLS deployment with authenticated SuperNodes, made with ``cryptography``.

A deployment needs three kinds: a CA of its own (so nothing outside it is trusted), the
SuperLink's server certificate signed by that CA, and one EC key pair per SuperNode, whose
public half the SuperLink registers (``flwr supernode register``) and whose private half the
SuperNode proves itself with (``--auth-supernode-private-key``). :func:`make_credentials` makes
them all in one folder; :class:`Credentials` says where they lie. Made fresh for each
deployment: nothing here is meant to be kept or reused across deployments.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshare.errors import FedShareError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The SuperLink's addresses on one machine (what the SuperNodes and the ``flwr`` CLI dial)."""


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


def _role(ca: bool) -> list[tuple[x509.ExtensionType, bool]]:
    """The critical extensions of a CA (signs certificates and CRLs, no intermediate below it)
    or of a leaf certificate (signs TLS handshakes, nothing else)."""
    return [(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True),
            (x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                           key_encipherment=False, data_encipherment=False, key_agreement=False,
                           key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                           decipher_only=False), True)]


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
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, days, _role(ca=True))
    server_key = ec.generate_private_key(curve)
    server = _certificate(_name(hosts[0] if hosts else "superlink"), server_key, ca_name, ca_key,
                          days, [*_role(ca=False),
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
