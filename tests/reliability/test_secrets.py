"""No secret in any message: database passwords holding URL syntax, credentials echoed by an HTTP server."""

from __future__ import annotations

import base64

import pytest

from octft.data.storage import AccessDeniedError, Retry, authorize_b2
from octft.redaction import normalise_url, redact_text, redact_url
from octft.stores import check_not_shared

from .conftest import REPO, one_error_line
from .echo_server import echo_401_server

# Each holds a character that URL parsers read as syntax: path, fragment, query, credentials end, port.
PASSWORDS = ["Tr0ub4dor/x9", "Tr0ub#4dor", "Tr0ub?4dor", "Hunter2@pw", "Tr0ub:4dor", "p@ss/w#rd?:x"]


def pieces(password: str) -> list[str]:
    """The password and every run of 3+ characters between its syntax characters: none may be shown."""
    import re

    return [password] + [part for part in re.split(r"[/#?@:]", password) if len(part) >= 3]


@pytest.mark.parametrize("password", PASSWORDS)
def test_storage_password_with_url_syntax_never_shows(password, capsys):
    # Port 1 on 127.0.0.1 refuses at once: the error comes from the driver, after every parser has run.
    url = f"postgresql://optuna:{password}@127.0.0.1:1/studies"
    line = one_error_line(capsys, "sweep", "status", REPO / "sweeps" / "demo.yaml", "--storage", url)
    assert "postgresql://optuna:***@127.0.0.1:1/studies" in line, line
    for piece in pieces(password):
        assert piece not in line, (piece, line)


@pytest.mark.parametrize("password", PASSWORDS)
def test_tracking_and_storage_urls_with_url_syntax_are_parsed_after_encoding(password):
    tracking = f"postgresql://mlflow:{password}@db:5432/octft"
    with pytest.raises(ValueError, match="same database") as refused:
        check_not_shared(tracking, f"postgresql://optuna:{password}@DB:5432/octft")
    for piece in pieces(password):
        assert piece not in str(refused.value)
    assert redact_url(tracking) == "postgresql://mlflow:***@db:5432/octft"
    assert normalise_url(normalise_url(tracking)) == normalise_url(tracking)  # encoding twice changes nothing


@pytest.mark.parametrize("as_json", [True, False], ids=["b2-json-error", "proxy-html-page"])
def test_b2_401_that_echoes_the_authorization_header_leaks_nothing(as_json, monkeypatch):
    key_id, key = "0041f00dcafe0000000000001", "K004SuperSecretApplicationKeyValue"
    monkeypatch.setenv("B2_APPLICATION_KEY_ID", key_id)
    monkeypatch.setenv("B2_APPLICATION_KEY", key)
    with echo_401_server(as_json=as_json) as url:
        with pytest.raises(AccessDeniedError) as refused:
            authorize_b2(realm=url, retry=Retry(attempts=2, sleep=lambda seconds: None))
    shown = str(refused.value)
    assert "Authorization" in shown and "B2 refused the application key" in shown  # the echo did come back
    basic = base64.b64encode(f"{key_id}:{key}".encode()).decode()
    for secret in (key, basic, basic.rstrip("=")):
        assert secret not in shown
    # The b2sdk error it replaces quotes the echo: a traceback must never print it.
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_redact_text_hides_echoed_credentials_in_any_encoding():
    text = ("{'Authorization': 'Basic QUJDOnNlY3JldA=='} Authorization: 4_002abcdef_token "
            "see postgresql://u:Tr0ub4dor/x9@h/db and secret%2Fkey")
    shown = redact_text(text, ["secret/key"])
    for secret in ("QUJDOnNlY3JldA", "4_002abcdef_token", "Tr0ub4dor", "x9@", "secret%2Fkey"):
        assert secret not in shown, (secret, shown)
