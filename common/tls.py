"""TLS serving material: a certificate directory (a Kubernetes TLS secret) or a self-signed
pair. The EPP's ``--secure-serving`` and the pd-sidecar's ``--secure-proxy`` both use it."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CERT_FILE", "KEY_FILE", "CertificatePair", "load_cert_dir", "self_signed"]

# The names Kubernetes TLS secrets use for their two keys.
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


@dataclass(frozen=True, slots=True)
class CertificatePair:
    cert_pem: bytes
    key_pem: bytes


def load_cert_dir(path: str | Path) -> CertificatePair:
    """Read ``tls.crt`` and ``tls.key`` from ``path``; errors name the missing file."""
    directory = Path(path)
    cert, key = directory / CERT_FILE, directory / KEY_FILE
    for file in (cert, key):
        if not file.is_file():
            raise FileNotFoundError(f"--cert-path: {file} does not exist")
    pair = CertificatePair(cert.read_bytes(), key.read_bytes())
    # Fail at start, not on the first handshake, when the files are not PEM.
    x509.load_pem_x509_certificate(pair.cert_pem)
    serialization.load_pem_private_key(pair.key_pem, password=None)
    return pair


def self_signed(
    hostnames: tuple[str, ...] = ("localhost",),
    valid_days: int = 365,
    *,
    ip_addresses: tuple[str, ...] = (),
    common_name: str = "epp",
) -> CertificatePair:
    """A fresh P-256 key and a certificate for it; gateways talk to the EPP unverified.

    The SANs are ``hostnames``, 127.0.0.1 and ``ip_addresses`` (e.g. the pod IP; the
    pd-sidecar's ``--secure-proxy`` uses this too).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    ips = dict.fromkeys(ipaddress.ip_address(a) for a in ("127.0.0.1", *ip_addresses))
    alt_names.extend(x509.IPAddress(ip) for ip in ips)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertificatePair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
