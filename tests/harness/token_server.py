"""A registry token server for tests: signs the JWTs docker-registry's `auth: token` checks.

The registry is the real part: it validates every token's signature against `rootcertbundle`,
its issuer, audience (service) and lifetime. This server only signs: RS256 with a key whose
self-signed certificate is that bundle, the certificate in the JWT header's `x5c` (what
distribution 2.8 looks up first: the chain must verify against the bundle).

It speaks the distribution token protocol: `GET <realm>?service=&scope=` with HTTP basic or
anonymously, and the OAuth2 `POST <realm>` with `grant_type=refresh_token` or `password`. Every
request is logged as one JSON line on stderr (method, grant, user, scopes, status), so tests can
count token requests. It runs as a process, on loopback or inside a mesh namespace: see
`start_token_server` in tests/harness/upstream.py.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import secrets
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

TOKEN_PATH = "/token"
DEFAULT_EXPIRES_IN = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and the self-signed certificate the registry's rootcertbundle holds."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, name: str = "peermirror test token issuer") -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write `token.crt` (the rootcertbundle) and `token.key`; returns both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / "token.crt"
        key_path = directory / "token.key"
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    @classmethod
    def read(cls, cert_path: Path, key_path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def sign(self, claims: dict[str, object]) -> str:
        """A compact JWS (RS256) carrying `claims`, the certificate in `x5c`."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode("ascii")]}
        signing_input = (
            b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        )
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)


def parse_scope(scope: str) -> dict[str, object] | None:
    """`repository:<name>:<actions>` -> a claim's access entry (None for other forms)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name or not actions:
        return None
    return {"type": kind, "name": name, "actions": actions.split(",")}


@dataclass
class TokenPolicy:
    """Who gets tokens: users by password, refresh tokens, and whether anonymous askers do."""

    issuer: str
    service: str
    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: frozenset[str] = frozenset()
    allow_anonymous: bool = False
    expires_in: int = DEFAULT_EXPIRES_IN

    def claims(self, subject: str, scopes: list[str]) -> dict[str, object]:
        now = int(time.time())
        access = [entry for s in scopes if (entry := parse_scope(s)) is not None]
        return {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            # Clocks of one machine: no skew, but the registry compares whole seconds.
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        return  # one JSON line per request instead (see _log)

    def _log(self, status: int, grant: str, user: str, scopes: list[str]) -> None:
        record = {
            "method": self.command,
            "path": self.path.split("?", 1)[0],
            "grant": grant,
            "user": user,
            "scopes": scopes,
            "status": status,
        }
        print(json.dumps(record), file=sys.stderr, flush=True)

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _basic_user(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization", "")
        if not value.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        except ValueError:
            return None
        return user, password

    def _issue(self, grant: str, subject: str | None, scopes: list[str]) -> None:
        policy = self.server.policy
        if subject is None:
            self._log(401, grant, "-", scopes)
            self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            return
        token = self.server.signing_key.sign(policy.claims(subject, scopes))
        self._log(200, grant, subject, scopes)
        self._answer(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": policy.expires_in,
                "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
            },
        )

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != TOKEN_PATH:
            self._answer(404, {})
            return
        query = urllib.parse.parse_qs(parts.query)
        scopes = query.get("scope", [])
        policy = self.server.policy
        creds = self._basic_user()
        if creds is None:
            self._issue("anonymous", "anonymous" if policy.allow_anonymous else None, scopes)
            return
        user, password = creds
        ok = policy.users.get(user) == password
        self._issue("basic", user if ok else None, scopes)

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path != TOKEN_PATH:
            self._answer(404, {})
            return
        length = int(self.headers.get("Content-Length", "0") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(min(length, 65536)).decode())
        grant = form.get("grant_type", [""])[0]
        scopes = " ".join(form.get("scope", [])).split()
        policy = self.server.policy
        subject: str | None = None
        if grant == "refresh_token":
            if form.get("refresh_token", [""])[0] in policy.refresh_tokens:
                subject = "refresh-token-holder"
        elif grant == "password":
            user = form.get("username", [""])[0]
            if policy.users.get(user) == form.get("password", [""])[0]:
                subject = user
        self._issue(grant or "none", subject, scopes)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], policy: TokenPolicy, key: SigningKey) -> None:
        super().__init__(address, _Handler)
        self.policy = policy
        self.signing_key = key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--user", action="append", default=[], help="name:password")
    parser.add_argument("--refresh-token", action="append", default=[])
    parser.add_argument("--anonymous", action="store_true")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    policy = TokenPolicy(
        issuer=args.issuer,
        service=args.service,
        users=dict(u.split(":", 1) for u in args.user),
        refresh_tokens=frozenset(args.refresh_token),
        allow_anonymous=args.anonymous,
    )
    server = _Server((host, int(port)), policy, SigningKey.read(args.cert, args.key))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
