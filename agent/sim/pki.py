"""A throw-away certificate authority for TLS tests and the demo: no openssl, no files to keep.

``make_pki(dir)`` writes a CA and the certificates a TLS test needs: a server certificate for
127.0.0.1/localhost, a client certificate (mutual TLS; its CN is the MQTT username when the
broker uses ``use_identity_as_username``), an expired server certificate, one for another host,
and a second, unrelated CA. EC P-256 keys: fast to make.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path            # the CA certificate clients and the broker trust
    other_ca: Path      # a CA that signed nothing here: the "wrong CA"
    server: Issued      # CN/SAN 127.0.0.1 and localhost
    client: Issued      # CN = the client name given to make_pki
    expired: Issued     # server certificate for 127.0.0.1, expired yesterday
    wrong_host: Issued  # server certificate for another host name only


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Issued:
    key_path = path.with_suffix(".key")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(path, key_path)


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *, hosts: tuple[str, ...] = (),
           client: bool = False, expired: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if hosts:
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path, client_name: str = "CAB-0001") -> Pki:
    """Write a CA and the certificates of ``Pki`` into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("cabinet-agent test CA")
    _other_key, other_cert = _ca("some other CA")
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    other_path = directory / "other-ca.pem"
    other_path.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    local = ("127.0.0.1", "localhost")
    return Pki(
        ca=ca_path,
        other_ca=other_path,
        server=_write(directory / "server.pem", *_issue(ca_key, ca_cert, "127.0.0.1", hosts=local)),
        client=_write(directory / "client.pem", *_issue(ca_key, ca_cert, client_name, client=True)),
        expired=_write(directory / "expired.pem", *_issue(ca_key, ca_cert, "127.0.0.1", hosts=local, expired=True)),
        wrong_host=_write(directory / "wrong-host.pem",
                          *_issue(ca_key, ca_cert, "broker.example.net", hosts=("broker.example.net",))),
    )
