"""Authentication: API keys (stored as SHA-256 digests, compared in constant time) and JWT bearer tokens.

API keys are long random secrets, so a fast hash is enough (as for GitHub or
Stripe tokens): a slow password hash would only add latency to every request.
The presented key's digest is compared with every stored digest through
`hmac.compare_digest`, without stopping at the first match.

JWTs are checked by PyJWT: signature, `exp` (required), `nbf`, `aud` (when an
audience is configured) and `iss` (when configured). Scopes come from the
OAuth2 `scope` claim (space-separated) or a `scopes` list; the rate-limit key
is the token's `sub`.

`admin` implies every other scope.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import jwt

from retro_peft.errors import InputError
from retro_peft.serving.errors import ApiError
from retro_peft.serving.settings import SCOPES, ApiKeyConfig, AuthConfig, JwtConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    name: str  # key name or JWT subject: the rate-limit key
    scopes: frozenset[str]
    kind: str  # "key", "jwt" or "anonymous"

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES), "anonymous")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_key_list(text: str) -> list[ApiKeyConfig]:
    """RETRO_PEFT_API_KEYS: comma-separated `KEY` or `KEY:scope+scope`; `sha256=HEX` in place of KEY
    gives the digest instead of the key. Without scopes a key may generate and retrieve."""
    keys = []
    for i, item in enumerate(x.strip() for x in text.split(",")):
        if not item:
            continue
        secret, _, scopes = item.partition(":")
        options = {"name": f"env-{i}"}
        if scopes:
            options["scopes"] = scopes.split("+")
        if secret.startswith("sha256="):
            options["key_sha256"] = secret[len("sha256="):]
        else:
            options["key"] = secret
        try:
            keys.append(ApiKeyConfig(**options))
        except ValueError as e:
            raise InputError(f"RETRO_PEFT_API_KEYS item {i + 1}: {e}") from None
    return keys


class Authenticator:
    def __init__(self, config: AuthConfig, env_keys: str | None = None):
        keys = list(config.keys) + (parse_key_list(env_keys) if env_keys else [])
        self._keys = [(bytes.fromhex(k.key_sha256) if k.key_sha256 else
                       hashlib.sha256(k.key.get_secret_value().encode()).digest(), k.name, frozenset(k.scopes))
                      for k in keys]
        self.jwt = config.jwt
        self._jwt_key = None
        if config.jwt.secret is not None:
            self._jwt_key = config.jwt.secret.get_secret_value()
        elif config.jwt.public_key_file:
            try:
                self._jwt_key = Path(config.jwt.public_key_file).read_text()
            except OSError as e:
                raise InputError(f"JWT public key file: {e}") from None
        if self._jwt_key is not None:
            _check_jwt_key(config.jwt, self._jwt_key)
        self.open = not self._keys and self._jwt_key is None
        if self.open and not config.allow_unauthenticated:
            raise InputError("no API keys and no JWT secret are configured: add auth.keys, RETRO_PEFT_API_KEYS or "
                             "auth.jwt.secret, or run without authentication explicitly (--no-auth)")

    def warn_if_open(self) -> None:
        if self.open:
            log.warning("authentication is OFF (asked for explicitly): anyone who reaches this server can use it")

    def authenticate(self, token: str | None) -> Principal:
        """The caller behind a bearer token; raises 401 when it is missing or invalid."""
        if self.open:
            return ANONYMOUS
        if not token:
            raise _unauthorized("missing credentials: send `Authorization: Bearer <API key or JWT>`", "missing_api_key")
        if self._jwt_key is not None and token.count(".") == 2:
            return self._from_jwt(token)
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, name, scopes in self._keys:  # every key is compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = Principal(name, scopes, "key")
        if found is None:
            raise _unauthorized("invalid API key", "invalid_api_key")
        return found

    def _from_jwt(self, token: str) -> Principal:
        options = {"require": ["exp"] + (["aud"] if self.jwt.audience else [])}
        try:
            claims = jwt.decode(token, self._jwt_key, algorithms=self.jwt.algorithms, audience=self.jwt.audience,
                                issuer=self.jwt.issuer, leeway=self.jwt.leeway_s, options=options)
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired", "token_expired") from None
        except jwt.ImmatureSignatureError:
            raise _unauthorized("the token is not valid yet (nbf)", "invalid_token") from None
        except jwt.PyJWTError as e:  # InvalidTokenError, and InvalidKeyError (not one of them) for the token's alg
            raise _unauthorized(f"invalid token: {e}", "invalid_token") from None
        raw = claims.get("scope", claims.get("scopes", []))
        scopes = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        return Principal(f"jwt:{claims.get('sub', 'unknown')}", frozenset(s for s in scopes if s in SCOPES), "jwt")


def _check_jwt_key(config: JwtConfig, key: str) -> None:
    """Prepare the key for every accepted algorithm now: a key that does not fit one (a PEM public key for
    HS256, a malformed PEM, an empty secret) would otherwise fail on every token instead of at start-up."""
    source = "auth.jwt.secret" if config.secret is not None else f"auth.jwt.public_key_file ({config.public_key_file})"
    if not config.algorithms:
        raise InputError("auth.jwt.algorithms is empty: no token could be verified")
    for name in config.algorithms:
        try:
            jwt.get_algorithm_by_name(name).prepare_key(key)
        except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError) as e:
            raise InputError(f"auth.jwt.algorithms: algorithm {name!r} cannot use {source}: {e}") from None


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, "authentication_error", code, headers={"WWW-Authenticate": "Bearer"})


def forbidden(scope: str) -> ApiError:
    return ApiError(403, f"this key or token lacks the {scope!r} scope", "permission_error", "insufficient_scope")
