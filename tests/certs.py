"""Test certificates: a cluster CA, a certificate it signs for every service (SANs: the cluster
name, localhost, 127.0.0.1), and a rogue CA with its own certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, cn: str, names: list[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
            for n in names]
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _write(d: Path, stem: str, key, cert) -> None:
    (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (d / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def make_certs(d: Path) -> Path:
    """Writes ca.pem, cluster.pem/.key, rogue-ca.pem, rogue.pem/.key into d."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("pdserve test cluster CA")
    _write(d, "ca", None, ca)
    key, cert = _leaf(ca_key, ca, "pdserve-internal", ["pdserve-internal", "localhost",
                                                       "127.0.0.1"])
    _write(d, "cluster", key, cert)
    rogue_ca_key, rogue_ca = _ca("somebody else's CA")
    _write(d, "rogue-ca", None, rogue_ca)
    key, cert = _leaf(rogue_ca_key, rogue_ca, "pdserve-internal", ["pdserve-internal",
                                                                   "localhost", "127.0.0.1"])
    _write(d, "rogue", key, cert)
    return d
