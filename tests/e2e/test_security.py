"""Safe defaults, proven on a real ``serve``: TLS on both ports, tokens, loopback binding, store-only loading.

One server runs with TLS (a certificate made here), an inference token and the management API
behind its own token; it is started without ``--host``, so it also shows the default binding.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as triton_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from service.protos import load_v2
from service.settings import Settings
from tests.e2e.conftest import BIN, Package, Server, free_port
from tests.e2e.protocols import PROTOCOLS, Endpoint, grpc_call, send_image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
INFERENCE_TOKEN = "inference-token-for-tests"
MANAGEMENT_TOKEN = "management-token-for-tests"


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    @property
    def root(self) -> bytes:
        return self.cert.read_bytes()


def make_self_signed(folder: Path) -> Tls:
    """A self-signed certificate for 127.0.0.1 and localhost (EC P-256, valid for a day)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgclf test server")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    tls = Tls(folder / "cert.pem", folder / "key.pem")
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tls.key.write_bytes(key_pem)
    tls.key.chmod(0o600)
    return tls


def start_tls_server(store: Path, log: Path, tls: Tls, *extra: str, env: dict[str, str]) -> Server:
    """``serve`` with --tls-cert/--tls-key on free ports (no --host), ready once HTTPS answers."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        str(BIN / "serve"), "--model-store", str(store), "--http-port", str(http_port),
        "--grpc-port", str(grpc_port), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), *extra,
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    server = Server(process, http_port, grpc_port, log)
    client = Endpoint(http_port, grpc_port, root_cert=tls.root).http_client()
    deadline = time.monotonic() + 120
    with client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if client.get("/v2/health/live", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"serve did not become live over HTTPS:\n{log.read_text()}")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(demo_package: Package, tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("secured") / "serve.log"
    env = {"SERVE_INFERENCE_TOKEN": INFERENCE_TOKEN, "SERVE_MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
    server = start_tls_server(demo_package.store, log, tls, "--enable-management", env=env)
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    assert INFERENCE_TOKEN not in text and MANAGEMENT_TOKEN not in text, "a token was written to the log"


def endpoint(server: Server, tls: Tls, token: str | None = INFERENCE_TOKEN) -> Endpoint:
    return Endpoint(server.http_port, server.grpc_port, root_cert=tls.root, token=token)


@pytest.fixture(scope="module")
def good(demo_package: Package) -> tuple[bytes, str]:
    path, label = sorted(demo_package.predictions.items())[0]
    return path.read_bytes(), label


# ---- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_works_over_tls_with_the_token(
    secured: Server, tls: Tls, good: tuple[bytes, str], protocol: str
) -> None:
    with endpoint(secured, tls).http_client() as http:
        outcome = send_image(endpoint(secured, tls), protocol, good[0], http=http)
    assert outcome.ok and outcome.label == good[1], outcome


def test_plaintext_and_untrusted_clients_are_refused(secured: Server, tls: Tls) -> None:
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port: no HTTP answer at all
        httpx.get(f"http://127.0.0.1:{secured.http_port}/v2/health/live", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # the certificate is checked
        httpx.get(f"https://127.0.0.1:{secured.http_port}/v2/health/live", timeout=10)
    messages = load_v2().messages
    with grpc.insecure_channel(f"127.0.0.1:{secured.grpc_port}") as channel:
        stub = load_v2().services.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerLive(messages.ServerLiveRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    reply, error = grpc_call(endpoint(secured, tls), "v2", "ServerLive", messages.ServerLiveRequest())
    assert error is None and reply.live


# ---- inference token ------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token", INFERENCE_TOKEN + "x", MANAGEMENT_TOKEN])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_inference_needs_the_inference_token(
    secured: Server, tls: Tls, good: tuple[bytes, str], protocol: str, token: str | None
) -> None:
    client = endpoint(secured, tls, token)
    with client.http_client() as http:
        outcome = send_image(client, protocol, good[0], http=http)
    assert outcome.is_refusal(401) and "inference token" in outcome.message, outcome


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_the_token_model_names_are_not_revealed(
    secured: Server, tls: Tls, good: tuple[bytes, str], protocol: str
) -> None:
    """An unknown model answers 401 like a known one: no token, no way to list models by probing."""
    client = endpoint(secured, tls, None)
    with client.http_client() as http:
        outcome = send_image(client, protocol, good[0], model="no-such-model", http=http)
    assert outcome.is_refusal(401), outcome


# ---- management -----------------------------------------------------------------------------------


def _triton(secured: Server, tls: Tls) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(
        f"127.0.0.1:{secured.grpc_port}", ssl=True, root_certificates=str(tls.cert)
    )


def test_grpc_management_needs_the_management_token(secured: Server, tls: Tls) -> None:
    client = _triton(secured, tls)
    try:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": f"Bearer {INFERENCE_TOKEN}"}):
            with pytest.raises(InferenceServerException, match="management token") as refused:
                client.get_model_repository_index(headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException, match="management token"):
                client.unload_model("demo", headers=headers)
        index = client.get_model_repository_index(headers={"authorization": f"Bearer {MANAGEMENT_TOKEN}"})
        assert [(m.name, m.state) for m in index.models] == [("demo", "READY")]
    finally:
        client.close()


CRAFTED_NAMES = ["../x", "../../etc", "/etc/passwd", "http://example.invalid/x.mar", "file:///etc/passwd", ".hidden"]


@pytest.mark.parametrize("name", CRAFTED_NAMES)
def test_management_loads_only_from_the_store(
    secured: Server, tls: Tls, demo_package: Package, name: str, tmp_path: Path
) -> None:
    """Names are folder names inside the store: never a path, never a URL (TorchServe's CVE-2023-43654)."""
    auth = {"authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    before = sorted(p.name for p in demo_package.store.iterdir())
    client = _triton(secured, tls)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(name, headers=auth)
    finally:
        client.close()
    assert refused.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"), refused.value
    assert str(demo_package.store) not in str(refused.value)
    quoted = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in name)
    with endpoint(secured, tls).http_client() as http:
        response = http.post(f"/v2/repository/models/{quoted}/load", headers={"Authorization": auth["authorization"]})
    assert response.status_code in (400, 404), response.text
    assert sorted(p.name for p in demo_package.store.iterdir()) == before
    with endpoint(secured, tls).http_client() as http:
        assert http.get("/v2/models/demo/ready").status_code == 200


# ---- binding --------------------------------------------------------------------------------------


def _listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, from /proc/net/tcp and tcp6."""
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(socket.inet_ntop(family, words))
    return addresses


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net/tcp")
def test_default_bind_is_loopback(secured: Server) -> None:
    assert Settings().host == "127.0.0.1"
    assert Settings().enable_management is False and Settings().inference_token == ""
    for port in (secured.http_port, secured.grpc_port):
        addresses = _listening(port)
        assert addresses and all(_is_loopback(a) for a in addresses), (port, addresses)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # grpc: ::ffff:127.0.0.1
    return (mapped or ip).is_loopback
