"""HTTPS upstreams and private CAs (docs/images.md, "Private CA"): the gateway image
trusts Debian's Mozilla roots plus every PEM file in /etc/ssl/certs/, or exactly the
bundle SSL_CERT_FILE names. An HTTPS upstream on 127.0.0.1 whose certificate comes from a
test CA made here serves a chat when that CA is mounted one of the documented ways, and
fails with an error that names the certificate problem when it is not."""

from __future__ import annotations

import datetime
import ipaddress
import selectors
import socket
import ssl
import threading
from pathlib import Path

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import TENANT_KEY, openai_backend, wait_for

MSG = [{"role": "user", "content": "hello over TLS"}]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Parley image tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(out: Path) -> dict[str, Path]:
    """A test CA and a server certificate for localhost and 127.0.0.1, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder()
          .subject_name(_name("Parley test CA")).issuer_name(_name("Parley test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    for p in paths.values():
        p.chmod(0o644)
    return paths


class TlsFrontend:
    """Terminates TLS on 127.0.0.1 and forwards the plain bytes to the mock: an HTTPS
    upstream with the test CA's certificate. Counts handshakes, keeps handshake errors."""

    def __init__(self, cert: Path, key: Path, target_port: int):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.errors.append(str(e))
            conn.close()
            return
        self.handshakes += 1
        up = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        sel = selectors.DefaultSelector()
        tls.setblocking(False)
        up.setblocking(False)
        sel.register(tls, selectors.EVENT_READ, up)
        sel.register(up, selectors.EVENT_READ, tls)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(timeout=0.2):
                    src, dst = key.fileobj, key.data
                    while True:
                        try:
                            data = src.recv(65536)
                        except (ssl.SSLWantReadError, BlockingIOError):
                            break
                        if not data:
                            return
                        dst.setblocking(True)
                        dst.sendall(data)
                        dst.setblocking(False)
                        if not (isinstance(src, ssl.SSLSocket) and src.pending()):
                            break
        except (OSError, ssl.SSLError):
            return
        finally:
            sel.close()
            tls.close()
            up.close()

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.accepter.join(5)
        for t in self.threads:
            t.join(5)


@pytest.fixture
def https_upstream(start_mock, tmp_path):
    mock = start_mock()
    pki = make_pki(tmp_path / "pki")
    front = TlsFrontend(pki["cert"], pki["key"], mock.port)
    yield front, pki, mock
    front.close()


def _chat(gw) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=30)
    return client.chat.completions.create(model="gpt-4o", messages=MSG)


def _models(front: TlsFrontend) -> list[dict]:
    # Retries would only repeat the same handshake: one attempt, and no breaker noise.
    return [{"name": "gpt-4o", "backends": [openai_backend(f"https://localhost:{front.port}/v1")],
             "retry": {"maxAttempts": 1}}]


def test_ca_file_mounted_into_etc_ssl_certs(https_upstream, start_gateway):
    """The documented way for a pod or container you run: mount the CA's PEM file as one
    more file in /etc/ssl/certs/ (the public roots stay trusted)."""
    front, pki, mock = https_upstream
    gw = start_gateway(_models(front), docker_args=["-v", f"{pki['ca']}:/etc/ssl/certs/parley-test-ca.pem:ro"])
    reply = _chat(gw)
    assert reply.choices[0].message.content
    assert front.handshakes >= 1 and not front.errors, front.errors
    assert mock.stats()["requests_total"] == 1


def test_ssl_cert_file_names_the_bundle(https_upstream, start_gateway):
    """SSL_CERT_FILE: exactly the certificates of that file are trusted (no public roots)."""
    front, pki, mock = https_upstream
    gw = start_gateway(_models(front), docker_args=[
        "-v", f"{pki['ca'].parent}:/var/run/parley/ca:ro", "-e", "SSL_CERT_FILE=/var/run/parley/ca/ca.pem"])
    assert _chat(gw).choices[0].message.content
    assert front.handshakes >= 1 and not front.errors, front.errors


def test_without_the_ca_the_chat_fails_with_a_certificate_error(https_upstream, start_gateway):
    front, pki, mock = https_upstream
    gw = start_gateway(_models(front))
    with pytest.raises(openai.APIStatusError) as err:
        _chat(gw)
    assert err.value.status_code == 502, err.value
    message = str(err.value).lower()
    assert "certificate" in message and ("unknownissuer" in message or "unknown issuer" in message), message
    assert mock.stats()["requests_total"] == 0
    # The frontend sees the gateway abort the handshake (its thread may log it a moment
    # after the gateway has answered).
    wait_for(lambda: front.errors, 5, "the frontend to see the refused handshake")
    assert front.handshakes == 0, front.errors
