"""Credentials out of URIs before a URI is shown: in model cards, reasons, errors and logs.

A tracking URI such as ``https://user:secret@mlflow.example.com/?token=abc`` carries its
credentials; :func:`redact_uri` keeps where it points and drops what opens it. It works on any
text that holds URIs (an exception message quoting a request URL), so one call covers both.
"""

from __future__ import annotations

import re

#: What a redacted secret reads as.
REDACTED = "***"
#: Query parameters that carry a secret (matched ignoring case, and as a suffix: access_token,
#: x-amz-signature, sas_sig, client_secret ...).
_SECRET_PARAMETERS = ("token", "password", "passwd", "secret", "key", "signature", "sig",
                      "credential", "auth", "authorization", "code")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s'\"]*@")
_QUERY = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_.-]*[_.-])?(?:" + "|".join(_SECRET_PARAMETERS)
    + r"))=[^&;#\s'\"]*",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """``text`` with the user information (``user:password@``) of every URI in it removed and
    the values of secret-bearing query parameters replaced by ``***``."""
    text = _USERINFO.sub(lambda m: m.group("scheme"), text)
    return _QUERY.sub(lambda m: f"{m.group('name')}={REDACTED}", text)
