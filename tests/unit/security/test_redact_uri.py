"""Credentials never shown with a URI (server/security/redact.py)."""

from __future__ import annotations

import pytest

from server.security.redact import redact_uri


@pytest.mark.parametrize(("shown", "redacted"), [
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://user:s3cr3t@mlflow.example.com/path", "https://mlflow.example.com/path"),
    ("http://token@host:5000", "http://host:5000"),
    ("mlflow+https://u:p@host", "mlflow+https://host"),
    ("https://host/?token=abc&page=2", "https://host/?token=***&page=2"),
    ("https://host/x?access_token=abc;X-Amz-Signature=def&sig=g",
     "https://host/x?access_token=***;X-Amz-Signature=***&sig=***"),
    ("https://host/?monkey=1&password=p#frag", "https://host/?monkey=1&password=***#frag"),
    ("API request to http://u:p@h:5000/api/2.0/mlflow/x?key=k failed with exception boom",
     "API request to http://h:5000/api/2.0/mlflow/x?key=*** failed with exception boom"),
    ("s3://bucket/model.onnx and runs:/abc/model", "s3://bucket/model.onnx and runs:/abc/model"),
])
def test_user_information_and_secret_parameters_are_dropped(shown: str, redacted: str) -> None:
    assert redact_uri(shown) == redacted
    assert redact_uri(redacted) == redacted
