"""Who may read the ledger: users with scrypt password hashes, a read token, a trusted proxy.

Reading the ledger reveals who reviewed what, so every dashboard page and read-API
route needs a principal. The webhook endpoint is not covered: it has its own secret.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request

from secledger.config import Settings
from secledger.errors import ConfigError
from secledger.keyfiles import ensure_secret_file
from secledger.spool import fsync_dir

SCHEME = "scrypt"
# OWASP's floor for scrypt is N=2^17 with r=8; 2^15 keeps a login near 0.1 s on a
# small server while costing an attacker 32 MiB per guess. Stored in each hash.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAXMEM = 256 * 1024 * 1024
COOKIE = "secledger_session"
# Over HTTPS: a cookie only this host can set (Secure, Path=/, no Domain), so a sibling
# subdomain cannot plant a session of its own in a visitor's browser (login CSRF).
SECURE_COOKIE = "__Host-secledger_session"
_SALT = "secledger.session.v1"
SESSION_ID_BYTES = 18


def cookie_name(*, secure: bool) -> str:
    """The session cookie's name: with the ``__Host-`` prefix whenever it is sent Secure."""
    return SECURE_COOKIE if secure else COOKIE


# The ASGI scope key where the app keeps the TCP peer, before X-Forwarded-For replaces
# the client: a trusted proxy is the machine that connected, not the address it names.
PEER = "secledger.peer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N) -> str:
    """``scrypt$N$r$p$salt$hash`` for ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=32
    )
    return f"{SCHEME}${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_hash_format(encoded: str) -> None:
    """Raise ConfigError when ``encoded`` is not a hash this module writes."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME or not all(p.isdigit() for p in parts[1:4]):
        raise ConfigError("a user's password hash is not scrypt$N$r$p$salt$hash")


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded`` (constant-time comparison)."""
    check_hash_format(encoded)
    _, n, r, p, salt, expected = encoded.split("$")
    digest = hashlib.scrypt(
        password.encode(),
        salt=_unb64(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        maxmem=_MAXMEM,
        dklen=len(_unb64(expected)),
    )
    return hmac.compare_digest(digest, _unb64(expected))


@functools.cache
def _dummy_hash() -> str:
    # Verifying against this when the user is unknown keeps the answer time the same,
    # so response timing does not tell which user names exist.
    return hash_password(secrets.token_urlsafe(16))


def read_users_file(path: Path) -> dict[str, str]:
    """``name:hash`` lines; blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        return {}
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, encoded = stripped.partition(":")
        if not sep or not name:
            raise ConfigError(f"{path} line {number}: expected name:hash")
        users[name] = encoded
    return users


def write_users_file(path: Path, users: dict[str, str]) -> None:
    """Replace the users file (mode 0600 when new) with ``users``, sorted by name.

    Written beside it and renamed over it: truncated in place, a full disk or a crash
    mid-write left a file with no users, and nobody could log in. A symbolic link is
    followed (the file it names is replaced), and an existing file's mode and owner are
    kept, so a ``serve`` running as another user still reads it; when the owner cannot
    be kept (not root), the file is rewritten in place, as before.
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "# secledger dashboard users: name:scrypt hash\n" + "".join(
        f"{user}:{hashed}\n" for user, hashed in sorted(users.items())
    )
    try:
        before = target.stat()
    except FileNotFoundError:
        before = None
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if before is not None:
            try:
                os.fchown(fd, before.st_uid, before.st_gid)
            except PermissionError:
                os.close(fd)
                fd = -1
                partial.unlink()
                _write_in_place(target, text)
                return
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
        with os.fdopen(fd, "w") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _write_in_place(target: Path, text: str) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def load_users(settings: Settings) -> dict[str, str]:
    """Users from the users file, then from settings (settings win); hashes checked."""
    from_file = read_users_file(settings.users_path)
    users = from_file | dict(settings.users)
    for name, encoded in users.items():
        try:
            check_hash_format(encoded)
        except ConfigError as exc:
            # Which user, and where it is set: the hash itself is not shown.
            where = "SECLEDGER_USERS" if name in settings.users else str(settings.users_path)
            raise ConfigError(f"user {name!r} in {where}: {exc}") from None
    return users


def session_secret(settings: Settings) -> bytes:
    """The cookie signing key: configured, or generated once into the data directory."""
    if settings.session_secret is not None:
        return settings.session_secret.get_secret_value().encode()
    return ensure_secret_file(settings.data_dir / "session-secret", 48).encode()


@dataclass(frozen=True)
class Principal:
    """An authenticated reader and how they proved it."""

    name: str
    method: str
    # A cookie session's random id and when the cookie expires: what logging out ends.
    session: str | None = None
    expires: datetime | None = None


def _networks(values: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(v, strict=False) for v in values]
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from exc


def check_access(settings: Settings) -> None:
    """Refuse bad users and trusted proxies before ``serve`` says it is receiving."""
    load_users(settings)
    _networks(settings.trusted_proxies)


class Authenticator:
    """Decides who a request is; built once per application."""

    def __init__(self, settings: Settings) -> None:
        self.users = load_users(settings)
        token = settings.read_token
        self._token = token.get_secret_value().encode() if token else b""
        secret = session_secret(settings)
        self._signer = URLSafeTimedSerializer(secret, salt=_SALT)
        self._stamp_key = hmac.new(secret, b"secledger password stamp", hashlib.sha256).digest()
        self.max_age = settings.session_max_age_seconds
        self.cookie_secure = settings.cookie_secure
        self._header = (settings.trusted_user_header or "").lower() or None
        self._proxies = _networks(settings.trusted_proxies)

    def check_password(self, name: str, password: str) -> bool:
        """True when ``name`` is a user and ``password`` is theirs."""
        encoded = self.users.get(name)
        matched = verify_password(password, encoded or _dummy_hash())
        return encoded is not None and matched

    def logged_name(self, name: str) -> str | None:
        """``name`` for a log line when it is a user; None otherwise: a name that is no
        user is often a password typed into the wrong field."""
        return name if name in self.users else None

    def session_cookie(self, name: str) -> str:
        """A signed, timestamped cookie value naming ``name``, their password's stamp and a
        random session id (what logging out ends on the server)."""
        session = secrets.token_urlsafe(SESSION_ID_BYTES)
        return self._signer.dumps({"u": name, "p": self._stamp(name), "s": session})

    def _stamp(self, name: str) -> str:
        """A keyed digest of the user's stored password hash: a new password (``secledger
        user add``) ends every session opened with the old one. Keyed, so the cookie,
        which anyone holding it can read, tells nothing about the hash."""
        encoded = self.users.get(name, "")
        return hmac.new(self._stamp_key, encoded.encode(), hashlib.sha256).hexdigest()[:32]

    def identify(self, request: Request, *, allow_token: bool) -> Principal | None:
        """The principal behind ``request``, or None."""
        if allow_token and self._token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self._token):
                return Principal("read-token", "token")
        proxied = self._from_proxy(request)
        if proxied is not None:
            return proxied
        return self._from_cookie(self.session_of(request))

    def secure(self, request: Request) -> bool:
        """Whether cookies go Secure (and ``__Host-``) on this request."""
        return bool(self.cookie_secure or request.url.scheme == "https")

    def session_of(self, request: Request) -> str | None:
        """The session cookie of ``request``: over HTTPS only the ``__Host-`` one."""
        return request.cookies.get(cookie_name(secure=self.secure(request)))

    def _from_cookie(self, value: str | None) -> Principal | None:
        if not value:
            return None
        try:
            data, signed_at = self._signer.loads(value, max_age=self.max_age, return_timestamp=True)
        except BadSignature:
            return None
        name = data.get("u") if isinstance(data, dict) else None
        session = data.get("s") if isinstance(data, dict) else None
        # A cookie without an id (from before 0024) could not be ended: log in again.
        if not isinstance(session, str) or not session:
            return None
        # A user removed from the configuration loses access at once; one whose password
        # changed, too.
        if not isinstance(name, str) or name not in self.users:
            return None
        if not hmac.compare_digest(str(data.get("p", "")), self._stamp(name)):
            return None
        expires = signed_at + timedelta(seconds=self.max_age)
        return Principal(name, "session", session, expires)

    def _from_proxy(self, request: Request) -> Principal | None:
        peer = request.scope.get(PEER, request.scope.get("client"))
        if self._header is None or not peer:
            return None
        name = request.headers.get(self._header, "").strip()
        if not name:
            return None
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return None
        if not any(address in network for network in self._proxies):
            return None
        return Principal(name, "proxy")
