"""Throwaway certificates for TLS tests, made with the ``openssl`` command-line tool.

* :func:`make_ca` makes a certificate authority (a self-signed CA certificate and its key);
* :func:`make_cert` makes a member certificate signed by a CA, for both TLS client and
  server use (the cluster's nodes and servers use the same kind of certificate);
* :func:`make_self_signed` makes a certificate signed by its own key (no CA at all);
* :func:`encrypt_key` copies a private key encrypted under a passphrase;
* the session-scoped fixture :func:`pki` makes a cluster CA with server and client
  certificates, and a second, unrelated CA with a certificate of its own, for "wrong
  certificate" tests.  Import it explicitly: ``from certs import pki``.

Keys are EC P-256 (quick to make); certificates are valid for two days from now.
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
from pathlib import Path

import pytest

#: seconds an openssl command may take
OPENSSL_TIMEOUT = 60


def _openssl(*args: str) -> None:
    """Run ``openssl ARGS``; fail the test with openssl's output if it fails."""
    res = subprocess.run(["openssl", *args], capture_output=True, text=True,
                         timeout=OPENSSL_TIMEOUT, check=False)
    if res.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed ({res.returncode}): "
                    f"{res.stdout}{res.stderr}")


@dataclasses.dataclass(frozen=True)
class Ca:
    """A certificate authority: its certificate and key (PEM file paths)."""

    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class Identity:
    """What one end of a TLS connection is given: the CA file it trusts, its own
    certificate and key (PEM file paths).  ``files`` is ``(ca, cert, key)``, the
    arguments of ``tls.server_context`` and ``tls.client_context``."""

    ca: str
    cert: str
    key: str

    @property
    def files(self) -> tuple[str, str, str]:
        return self.ca, self.cert, self.key


def _new_key(key: Path) -> list[str]:
    """openssl req arguments making a new unencrypted EC P-256 key in ``key``."""
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key)]


def make_ca(directory: Path, name: str = "ca") -> Ca:
    """A new CA in ``directory``: ``NAME.pem`` (its certificate, CN=NAME) and ``NAME.key``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-new", *_new_key(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Ca(str(cert), str(key))


#: extensions of a member certificate: not a CA, for TLS servers and clients, for the
#: addresses the tests use
_MEMBER_EXTENSIONS = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = {usage}
subjectAltName = @names

[names]
IP.1 = 127.0.0.1
DNS.1 = localhost
"""


def make_cert(ca: Ca, directory: Path, name: str, usage: str = "serverAuth,clientAuth",
              padding: int = 0) -> tuple[str, str]:
    """A new certificate (CN=``name``) signed by ``ca``, for the extended key usages
    ``usage``, made about ``padding`` bytes bigger with made-up DNS names; returns the
    paths ``(cert, key)`` of ``NAME.pem`` and ``NAME.key`` in ``directory``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    pad = "".join(f"DNS.{i} = padding-{i:06d}.invalid\n" for i in range(2, 2 + padding // 26))
    ext.write_text(_MEMBER_EXTENSIONS.format(usage=usage) + pad)
    _openssl("req", "-new", *_new_key(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", ca.cert, "-CAkey", ca.key,
             "-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", str(cert),
             "-extfile", str(ext))
    return str(cert), str(key)


def make_self_signed(directory: Path, name: str) -> tuple[str, str]:
    """A new certificate (CN=``name``) signed by its own key, no CA; returns the paths
    ``(cert, key)``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-new", *_new_key(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:FALSE")
    return str(cert), str(key)


def encrypt_key(key: str, directory: Path, passphrase: str = "secret") -> str:
    """A copy of the private key ``key`` encrypted (AES-256) under ``passphrase``;
    returns its path."""
    out = directory / (Path(key).stem + "-encrypted.key")
    _openssl("pkey", "-in", key, "-aes256", "-passout", f"pass:{passphrase}", "-out", str(out))
    return str(out)


@dataclasses.dataclass(frozen=True)
class Pki:
    """Certificates for TLS tests, all in ``dir``.

    Attributes:
        ca: the cluster CA.
        server, client: members of the cluster (certificates signed by ``ca``, trusting
            ``ca``).
        other_ca: a CA unrelated to the cluster.
        outsider: a member of the other CA's cluster (certificate signed by
            ``other_ca``, trusting ``other_ca``).
        impostor: a certificate signed by ``other_ca`` that trusts the cluster CA (it
            accepts the cluster's servers; they must not accept it).
        self_signed: a certificate signed by its own key, trusting the cluster CA.
        server_only: a certificate signed by ``ca`` for TLS servers only (extended key
            usage serverAuth), trusting ``ca``.
        bulky: a member whose certificate is about 64 KiB (its handshake messages do not
            fit a small socket buffer).
    """

    dir: Path
    ca: Ca
    server: Identity
    client: Identity
    other_ca: Ca
    outsider: Identity
    impostor: Identity
    self_signed: Identity
    server_only: Identity
    bulky: Identity


def make_pki(directory: Path) -> Pki:
    """Make every certificate of a :class:`Pki` in ``directory``."""
    ca = make_ca(directory, "cluster-ca")
    other = make_ca(directory, "other-ca")
    outsider = make_cert(other, directory, "outsider")
    return Pki(
        dir=directory, ca=ca,
        server=Identity(ca.cert, *make_cert(ca, directory, "server")),
        client=Identity(ca.cert, *make_cert(ca, directory, "client")),
        other_ca=other,
        outsider=Identity(other.cert, *outsider),
        impostor=Identity(ca.cert, *outsider),
        self_signed=Identity(ca.cert, *make_self_signed(directory, "self-signed")),
        server_only=Identity(ca.cert, *make_cert(ca, directory, "server-only",
                                                 usage="serverAuth")),
        bulky=Identity(ca.cert, *make_cert(ca, directory, "bulky", padding=64 << 10)),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test session's certificates: see :class:`Pki`."""
    return make_pki(tmp_path_factory.mktemp("pki"))
