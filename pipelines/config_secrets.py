"""Secrets in a config: ``${VAR}`` references, which values are secret, and scrubbing them.

``source.storage_options`` may reference environment variables (``${VAR}``; ``$${VAR}`` is a
literal ``${VAR}``), resolved when the config is validated (``pipelines/config.py``). Only that
form is a reference: any other ``${...}`` (``${VAR:-default}``, ``${ VAR }``) is an error, as the
text would otherwise reach fsspec as written (``$${...}`` is a literal ``${...}``; a bare ``$``,
as in a password, is plain text). The values of secret-looking option keys and variables, and
the Qdrant API key, are what :func:`redact` and :func:`redact_obj` scrub from every console line,
report, dead letter and error message; echoed configs show the references as written, never
their values.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Mapping
from urllib.parse import quote, quote_plus

__all__ = ["REDACTED", "ENV_NAME", "MissingEnv", "BadEnvRef", "substitute_env", "is_secret_key", "is_secret_var",
           "redacted_options", "secret_leaves", "scrub_url", "redact", "redact_obj"]

REDACTED = "***"

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # an environment variable's name
# Every "${...}" (or escaped "$${...}"); what is inside is checked against ENV_NAME.
_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_PURE_REFS = re.compile(r"^(?:\$\{[A-Za-z_][A-Za-z0-9_]*\})+$")


class MissingEnv(Exception):
    """A ``${VAR}`` reference to a variable that is not set (``where``: the dotted key)."""

    def __init__(self, var: str, where: str):
        super().__init__(var)
        self.var, self.where = var, where


class BadEnvRef(Exception):
    """A ``${...}`` that is not a ``${NAME}`` reference (``where``: the dotted key; the text is not kept)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def substitute_env(value: Any, where: str, resolved: dict[str, str]) -> Any:
    """Replace ``${VAR}`` in every string of a nested structure; record what was resolved.

    Raises MissingEnv for an unset variable and BadEnvRef for a ``${...}`` that is not ``${NAME}``.
    """
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            if m.group(1):  # "$${VAR}" -> literal "${VAR}" (any "$${...}" -> "${...}")
                return "${" + m.group(2) + "}"
            var = m.group(2)
            if not ENV_NAME.fullmatch(var):
                # A shell form (${VAR:-x}, ${ VAR }) would reach fsspec as written, silently.
                raise BadEnvRef(where)
            if var not in os.environ:
                raise MissingEnv(var, where)
            resolved[var] = os.environ[var]
            return os.environ[var]

        return _ENV_REF.sub(repl, value)
    if isinstance(value, Mapping):
        return {k: substitute_env(v, f"{where}.{k}", resolved) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [substitute_env(v, f"{where}.{i}", resolved) for i, v in enumerate(value)]
    return value


_SECRET_KEY_PARTS = (
    "key",  # key, access_key, account_key, aws_access_key_id, aws_secret_access_key, sse...key
    "secret",
    "token",  # token, session_token, sas_token, aws_session_token
    "password",
    "passwd",
    "pwd",
    "credential",
    "connection_string",
    "auth",
    "signature",
    "private",
    "cookie",
)


def is_secret_key(key: Any) -> bool:
    """True for option names that look like they hold a secret (case-insensitive)."""
    k = str(key).lower()
    return k == "sas" or any(part in k for part in _SECRET_KEY_PARTS)


def is_secret_var(name: str) -> bool:
    """True for environment variable names that look like they hold a secret."""
    n = name.lower()
    return any(part in n for part in ("key", "secret", "token", "password", "passwd", "credential", "auth"))


def redacted_options(value: Any, secret: bool = False) -> Any:
    """Storage options as written (``${VAR}`` kept), secret-looking keys as ``***``."""
    if secret:
        # A value made only of ${VAR} references names variables, not secrets: echo it.
        if isinstance(value, str) and _PURE_REFS.match(value):
            return value
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redacted_options(v, is_secret_key(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted_options(v) for v in value]
    return value


def _string_leaves(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _string_leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _string_leaves(v)


def secret_leaves(value: Any, secret: bool = False) -> Iterable[str]:
    """Every string under a secret-looking key of a nested structure."""
    if secret:
        yield from _string_leaves(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from secret_leaves(v, is_secret_key(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from secret_leaves(v)


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]*)@")


def scrub_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret (also URL-quoted) in ``text`` by ``***``.

    Empty secrets are ignored; longer secrets are replaced first. Passwords in
    ``scheme://user:password@host`` URLs are scrubbed too.
    """
    text = str(text)
    variants: set[str] = set()
    for s in secrets:
        if not s:
            continue
        s = str(s)
        variants.update((s, quote(s, safe=""), quote_plus(s)))
    for s in sorted(variants, key=len, reverse=True):
        if s in text:
            text = text.replace(s, REDACTED)
    return scrub_url(text)


def redact_obj(obj: Any, secrets: Iterable[str]) -> Any:
    """:func:`redact` applied to every string (keys included) of a nested dict/list structure."""
    secrets = [s for s in secrets if s]

    def walk(o: Any) -> Any:
        if isinstance(o, str):
            return redact(o, secrets)
        if isinstance(o, Mapping):
            return {(walk(k) if isinstance(k, str) else k): walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


class _RedactingFilter(logging.Filter):
    """Scrubs secret values from log records (message, arguments, traceback) before any handler writes them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub the record in place; always keep it."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: keep its parts, scrubbed
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def redact_logs(secrets: list[str]) -> None:
    """Make every root log handler of this process scrub the config's secrets (debug logs of S3 clients
    print signed request headers, which hold the access key id)."""
    if not secrets:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter(list(secrets)))
