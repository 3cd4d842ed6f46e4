# SPDX-License-Identifier: AGPL-3.0-or-later
"""A temporary certificate authority for a mesh's Dask TLS (``sharedllm up --tls``, tests). No Dask.

One CA and one certificate valid for both ends of a connection (server and client auth), because Dask's TLS is
mutual: the scheduler, the workers and the clients all present the same kind of certificate signed by the CA.
For real machines, issue a certificate per machine from your own CA and pass them with the ``--tls-*`` options.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLSFiles:
    ca: str
    cert: str
    key: str

    def security(self):
        """A ``distributed.security.Security`` for a client of a mesh using these files."""
        from distributed.security import Security

        return Security(tls_ca_file=self.ca, tls_client_cert=self.cert, tls_client_key=self.key,
                        require_encryption=True)

    def dask_args(self) -> list[str]:
        """Command-line options for ``dask scheduler`` / ``dask worker``."""
        return ["--tls-ca-file", self.ca, "--tls-cert", self.cert, "--tls-key", self.key]


def make_mesh_ca(directory: str | os.PathLike, hosts: list[str] | None = None, days: int = 30) -> TLSFiles:
    """Write ``ca.pem``, ``mesh.pem`` and ``mesh-key.pem`` (0600) into ``directory``; the certificate names
    127.0.0.1, localhost and ``hosts``."""
    cert, key, ca = write_ca_and_cert(directory, ca_name="SharedLLM mesh CA", cert_name="sharedllm mesh member",
                                      cert_file="mesh.pem", key_file="mesh-key.pem", hosts=hosts, days=days,
                                      client_auth=True)
    return TLSFiles(ca, cert, key)


def write_ca_and_cert(directory: str | os.PathLike, *, ca_name: str, cert_name: str, cert_file: str, key_file: str,
                      hosts: list[str] | None = None, days: int = 30,
                      client_auth: bool = False) -> tuple[str, str, str]:
    """Make a small CA and one certificate it signs (EC P-256) for 127.0.0.1, localhost and ``hosts``; write
    ``ca.pem``, ``cert_file`` and ``key_file`` (0600) into ``directory``; return ``(cert, key, ca)`` paths.

    The certificate is for TLS servers, and for clients too with ``client_auth`` (Dask's TLS is mutual)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from sharedllm.security import write_private

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(issuer).issuer_name(issuer).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(["127.0.0.1", "localhost", *(hosts or [])]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cert_name)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    cert_path, key_path, ca_path = d / cert_file, d / key_file, d / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    write_private(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path), str(ca_path)
