"""The two errors a pipeline reports to its user: bad input, and output that fails its checks."""

from __future__ import annotations

import re

__all__ = ["InputError", "ValidationError", "one_line", "redact"]


class InputError(ValueError):
    """Bad input to a pipeline (a URL, a column, a parameter); the message says what to do."""


class ValidationError(RuntimeError):
    """A new version does not meet the data contract; it is not published."""


# user:password@ in a URL, and key=value pairs whose name says they hold a secret
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_SECRET_PAIR = re.compile(
    r"(?P<name>\bkey\b|[\w.\-]*(?:password|passwd|secret|token|credential|sig|access[_-]?key)[\w.\-]*)"
    r"(?P<sep>['\"]?\s*=\s*['\"]?|['\"]\s*:\s*['\"])(?P<value>[^\s&'\",;)}]+)",
    re.IGNORECASE,
)


def redact(text):
    """``text`` with passwords in URLs and values of secret-looking ``name=value`` pairs masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _SECRET_PAIR.sub(lambda m: f"{m['name']}{m['sep']}***", text)


def one_line(exc):
    """The first line of an exception's message, led by its type, with secrets masked."""
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)
