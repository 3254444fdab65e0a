"""Transport security and the cluster credential.

TLS is off unless a service is given `--tls-cert-file` and `--tls-key-file` (paths; the key and
certificates are read from files, never from the command line). With `--tls-ca-file` too, the
cluster runs mutual TLS: the CA is the cluster credential.

- Internal servers (prefill, decode, kvstore, and the gateway's internal port, which carries the
  worker registry) require a client certificate signed by the CA: a peer without the cluster
  credential cannot even complete the handshake.
- The gateway's public port serves TLS without client certificates; tenants authenticate with
  bearer tokens (services/auth.py).
- Internal channels present this process's certificate and verify the server's against the CA
  under one cluster name (`--tls-server-name`, default `pdserve-internal`), so certificates need
  not list pod IPs.

The process-wide configuration is set once at start-up by `configure()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc


@dataclass(frozen=True)
class TLS:
    cert: bytes
    key: bytes
    ca: bytes | None
    server_name: str

    @property
    def mutual(self) -> bool:
        return self.ca is not None


_tls: TLS | None = None


class SecurityError(ValueError):
    """A bad security setting; the message names it."""


def _read(flag: str, path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"{flag}: cannot read {path}: {e.strerror}") from None
    if not data.strip():
        raise SecurityError(f"{flag}: {path} is empty")
    return data


def load_tls(cert_file: Path | None, key_file: Path | None, ca_file: Path | None,
             server_name: str = "pdserve-internal") -> TLS | None:
    if cert_file is None and key_file is None:
        if ca_file is not None:
            raise SecurityError("--tls-ca-file (PDSERVE_TLS_CA_FILE) needs --tls-cert-file and "
                                "--tls-key-file: mutual TLS presents this service's certificate")
        return None
    if cert_file is None or key_file is None:
        raise SecurityError("--tls-cert-file (PDSERVE_TLS_CERT_FILE) and --tls-key-file "
                            "(PDSERVE_TLS_KEY_FILE) go together")
    return TLS(_read("--tls-cert-file", cert_file), _read("--tls-key-file", key_file),
               _read("--tls-ca-file", ca_file) if ca_file else None, server_name)


class TLSSettings(Protocol):
    """The TLS fields every service's settings have (pdserve/config.py)."""

    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_ca_file: Path | None
    tls_server_name: str


def configure(settings: TLSSettings) -> TLS | None:
    """Sets this process's TLS from its settings (services call it once, at start-up)."""
    global _tls
    _tls = load_tls(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file,
                    settings.tls_server_name)
    return _tls


def current() -> TLS | None:
    return _tls


def server_credentials(internal: bool) -> grpc.ServerCredentials | None:
    if _tls is None:
        return None
    require = internal and _tls.mutual
    return grpc.ssl_server_credentials([(_tls.key, _tls.cert)],
                                       root_certificates=_tls.ca if require else None,
                                       require_client_auth=require)


def channel_credentials(tls: TLS | None = None) -> tuple[grpc.ChannelCredentials | None,
                                                         list[tuple[str, str]]]:
    """Credentials and extra options of an internal channel (this process's TLS unless `tls`
    is given; None: plaintext)."""
    tls = tls or _tls
    if tls is None:
        return None, []
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca or tls.cert,
                                         private_key=tls.key if tls.mutual else None,
                                         certificate_chain=tls.cert if tls.mutual else None)
    return creds, [("grpc.ssl_target_name_override", tls.server_name)]


def sync_channel(address: str, tls: TLS | None) -> grpc.Channel:
    """A blocking channel with `tls`'s credentials (tools and `pdserve up` health checks)."""
    creds, options = channel_credentials(tls) if tls is not None else (None, [])
    if creds is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, creds, options=options)
