"""``deltamask flower secure-files`` (issue 22): what the secure deployment needs, made offline. The
certificate chain verifies for the names asked, the node keys are what flower-supernode and flwr read, private
files are 0600, nothing is overwritten, and the proxy forwards the Fleet API alone."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deltamask.engines.flower.secure import FLEET_PREFIX, SecureFilesError, secure_files

pytestmark = pytest.mark.flower


@pytest.fixture(scope="module")
def made(tmp_path_factory):  # noqa: ANN201
    d = tmp_path_factory.mktemp("sec") / "files"
    return d, secure_files(d, 2, ["10.0.0.5", "server.example"], listen="0.0.0.0:9092", superlink="127.0.0.1:9093")


def test_private_files_are_private_and_public_ones_readable(made) -> None:
    d, files = made
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name, path in files.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        private = name.endswith((".key", ".secret"))
        assert mode == (0o600 if private else 0o644), (name, oct(mode))
    assert len(files["superexec.secret"].read_bytes()) == 64 and files["node-0.secret"].read_bytes() != files["superexec.secret"].read_bytes()


def test_the_server_certificate_chains_to_the_ca_for_the_names_asked(made) -> None:
    from cryptography import x509

    d, files = made
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    cert = x509.load_pem_x509_certificate(files["server.crt"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the names asked, and always loopback: the proxy, the ServerApp and an operator on the server connect there
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["server.example", "localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # and openssl agrees (what TLS clients do)
    for check in (["-verify_ip", "10.0.0.5"], ["-verify_ip", "127.0.0.1"], ["-verify_hostname", "server.example"],
                  ["-verify_hostname", "localhost"]):
        r = subprocess.run(["openssl", "verify", *check, "-CAfile", str(files["ca.crt"]), str(files["server.crt"])],
                           capture_output=True, text=True)
        assert r.returncode == 0 and ": OK" in r.stdout, (check, r.stdout + r.stderr)
    r = subprocess.run(["openssl", "verify", "-verify_ip", "10.0.0.6", "-CAfile", str(files["ca.crt"]), str(files["server.crt"])],
                       capture_output=True, text=True)
    assert r.returncode != 0  # and not for another address


def test_node_keys_are_what_flower_reads(made) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    _, files = made
    for i in range(2):
        priv = load_ssh_private_key(files[f"node-{i}.key"].read_bytes(), None)  # as flower-supernode does
        pub = load_ssh_public_key(files[f"node-{i}.pub"].read_bytes())  # as flwr supernode register does
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
        assert priv.public_key().public_numbers() == pub.public_numbers()
    assert files["node-0.pub"].read_bytes() != files["node-1.pub"].read_bytes()


def test_the_proxy_forwards_the_fleet_api_alone(made) -> None:
    d, files = made
    conf = files["nginx.conf"].read_text()
    locations = re.findall(r"location (\S+) \{", conf)
    assert locations == [FLEET_PREFIX, "/"] and FLEET_PREFIX == "/v1/fleet/"
    assert conf.count("proxy_pass") == 1 and "proxy_pass https://127.0.0.1:9093;" in conf
    assert "location / { return 404; }" in conf and "listen 0.0.0.0:9092 ssl;" in conf
    assert "proxy_ssl_verify on;" in conf and f'proxy_ssl_trusted_certificate "{d.resolve()}/ca.crt";' in conf
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    r = subprocess.run([nginx, "-t", "-c", str(files["nginx.conf"]), "-p", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_nothing_is_overwritten(made) -> None:
    d, files = made
    before = files["ca.key"].read_bytes()
    with pytest.raises(SecureFilesError, match="exists: refusing to overwrite it"):
        secure_files(d, 1)
    assert files["ca.key"].read_bytes() == before


def test_the_cli_says_what_it_wrote_and_refuses_a_bad_count(tmp_path) -> None:
    cli = [sys.executable, "-m", "deltamask.app.cli", "flower", "secure-files"]
    r = subprocess.run([*cli, str(tmp_path / "x"), "--nodes", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nodes/node-0.pub" in r.stdout, r.stderr
    r = subprocess.run([*cli, str(tmp_path / "y"), "--nodes", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--nodes must be >= 1" in r.stderr
    r = subprocess.run([*cli, str(tmp_path / "x"), "--nodes", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr


def test_a_folder_with_a_space_in_its_path_works_for_nginx(tmp_path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    d = tmp_path / "with space" / "sec"
    files = secure_files(d, 1)
    r = subprocess.run([nginx, "-t", "-c", str(files["nginx.conf"]), "-p", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
