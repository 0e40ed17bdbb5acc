"""The files of a secure Flower deployment, made offline (``deltamask flower secure-files DIR``).

Flower 1.42 ships no command that makes them. This writes, with Python's ``cryptography`` (a dependency of
flwr), everything docs/flower.md's secure topology needs:

* ``ca.crt`` / ``ca.key`` -- a certificate authority of this federation (keep ``ca.key`` offline after use);
* ``server.crt`` / ``server.key`` -- the SuperLink's TLS certificate, for the names and addresses the nodes
  use (``--host``, repeatable) and always ``127.0.0.1``, ``::1`` and ``localhost`` (the proxy, the ServerApp
  and an operator on the server reach the SuperLink there); the reverse proxy serves the same certificate;
* ``nodes/node-I.key`` / ``nodes/node-I.pub`` -- each SuperNode's authentication key pair (ECDSA P-384,
  OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read them);
* ``superexec.secret`` -- the SuperLink's SuperExec secret (``--superexec-auth-secret-file``: without it the
  runtime task endpoints are open), and ``nodes/node-I.secret`` for each SuperNode's own;
* ``nginx.conf`` -- a reverse proxy that serves the nodes' address and forwards **only** the Fleet API
  (``/v1/fleet/``) to the SuperLink, which listens on loopback: the Control API (run apps, stop runs, read
  logs) and the Runtime API are not reachable from the nodes' network (see :func:`nginx_conf`).

Every private file is written mode 0600 and the folder mode 0700; an existing file is never overwritten
(a second call with the same folder refuses, naming it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

#: the path prefix of Flower 1.42's Fleet API (flwr/superlink/routers/fleet/router.py); the Control API is
#: /v1/control/, the Runtime API /v1/runtime/, all on the SuperLink's one --host/--port
FLEET_PREFIX = "/v1/fleet/"


class SecureFilesError(ValueError):
    """The files could not be made as asked; the message says why."""


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise SecureFilesError(f"{path} exists: refusing to overwrite it (use another folder, or delete it)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _names(hosts: list[str]) -> list[object]:
    from cryptography import x509

    out: list[object] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_ca(days: int = 825) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deltamask federation CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key: object, ca_cert: object, hosts: list[str], days: int = 825) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return key, cert


def node_key_pair() -> tuple[bytes, bytes]:
    """(private key, public key), OpenSSH format, ECDSA P-384: what flower-supernode and flwr read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def nginx_conf(directory: Path, listen: str, superlink: str, server_name: str = "localhost") -> str:
    """An nginx configuration (run as ``nginx -c DIR/nginx.conf -p DIR``) that listens on ``listen``
    (``HOST:PORT``, the address the nodes reach) with the federation's TLS certificate and forwards only
    ``/v1/fleet/`` to the SuperLink at ``superlink`` (``127.0.0.1:PORT``, loopback), over TLS, verifying the
    SuperLink's certificate against the federation's CA. Every other path (the Control API, the Runtime API,
    the docs) is answered 404 by nginx itself and never reaches the SuperLink."""
    d = directory.resolve()
    return f"""# deltamask flower secure-files: a Fleet-only reverse proxy in front of the SuperLink (Flower 1.42)
# run: nginx -c "{d}/nginx.conf" -p "{d}"     stop: nginx -c "{d}/nginx.conf" -p "{d}" -s quit
daemon off;
pid "{d}/nginx.pid";
error_log "{d}/nginx-error.log" warn;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log "{d}/nginx-access.log";
    client_body_temp_path "{d}/nginx-tmp";
    proxy_temp_path "{d}/nginx-tmp";
    fastcgi_temp_path "{d}/nginx-tmp";
    uwsgi_temp_path "{d}/nginx-tmp";
    scgi_temp_path "{d}/nginx-tmp";
    server_tokens off;
    # a bound on what one request may carry (Flower sends objects in chunks of a few MB)
    client_max_body_size 64m;
    server {{
        listen {listen} ssl;
        ssl_certificate "{d}/server.crt";
        ssl_certificate_key "{d}/server.key";
        ssl_protocols TLSv1.2 TLSv1.3;
        # the SuperNodes' API, and nothing else
        location {FLEET_PREFIX} {{
            proxy_pass https://{superlink};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate "{d}/ca.crt";
            proxy_ssl_verify on;
            proxy_ssl_name {server_name};
            proxy_ssl_server_name on;
            proxy_set_header Host $host;
            # stream bodies both ways: no temporary files (the worker may not own the prefix)
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        # the Control API (flwr run / stop / log), the Runtime API and the docs are not served here
        location / {{ return 404; }}
    }}
}}
"""


def secure_files(directory: str | Path, nodes: int, hosts: list[str] | None = None, listen: str = "0.0.0.0:9092",
                 superlink: str = "127.0.0.1:9093") -> dict[str, Path]:
    """Make the secure deployment's files in ``directory`` (created mode 0700; see the module docstring);
    returns {name: path}."""
    from cryptography.hazmat.primitives import serialization

    if nodes < 1:
        raise SecureFilesError(f"--nodes must be >= 1, got {nodes}")
    hosts = list(hosts or [])
    # loopback names always: the proxy, the ServerApp the SuperLink starts and an operator on the server (or through
    # an SSH tunnel) all reach the SuperLink at 127.0.0.1 and check the certificate for it
    hosts += [h for h in ("127.0.0.1", "::1", "localhost") if h not in hosts]
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    (d / "nodes").mkdir(mode=0o700, exist_ok=True)
    (d / "nginx-tmp").mkdir(mode=0o700, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, ca_cert = make_ca()
    key, cert = make_server_cert(ca_key, ca_cert, hosts)
    no_pw = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    out = {"ca.crt": d / "ca.crt", "ca.key": d / "ca.key", "server.crt": d / "server.crt", "server.key": d / "server.key",
           "superexec.secret": d / "superexec.secret", "nginx.conf": d / "nginx.conf"}
    _write_private(out["ca.key"], ca_key.private_bytes(pem, pkcs8, no_pw))  # type: ignore[attr-defined]
    _write_private(out["ca.crt"], ca_cert.public_bytes(pem), 0o644)  # type: ignore[attr-defined]
    _write_private(out["server.key"], key.private_bytes(pem, pkcs8, no_pw))  # type: ignore[attr-defined]
    _write_private(out["server.crt"], cert.public_bytes(pem), 0o644)  # type: ignore[attr-defined]
    _write_private(out["superexec.secret"], secrets.token_hex(32).encode())
    for i in range(nodes):
        private, public = node_key_pair()
        out[f"node-{i}.key"], out[f"node-{i}.pub"], out[f"node-{i}.secret"] = (
            d / "nodes" / f"node-{i}.key", d / "nodes" / f"node-{i}.pub", d / "nodes" / f"node-{i}.secret")
        _write_private(out[f"node-{i}.key"], private)
        _write_private(out[f"node-{i}.pub"], public, 0o644)
        _write_private(out[f"node-{i}.secret"], secrets.token_hex(32).encode())
    _write_private(out["nginx.conf"], nginx_conf(d, listen, superlink).encode(), 0o644)
    return out
