"""API tokens on SQLite and PostgreSQL: shown once, stored hashed, revocable; the CLI."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text

from service.cli import main
from service.db import ApiToken, make_engine, session_factory, upgrade
from service.db.testing import temporary_database
from service.db.tokens import TokenError, create_token, hash_token, list_tokens, revoke_token, verify_token


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    with temporary_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def Session(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def test_token_is_random_and_only_its_hash_is_stored(Session):
    with Session.begin() as s:
        token = create_token(s, "alice")
        other = create_token(s, "bob")
    assert token.startswith("em_") and len(token) > 40 and token != other
    with Session() as s:
        rows = s.execute(text("SELECT * FROM em_api_tokens")).mappings().all()
    stored = " ".join(str(v) for row in rows for v in row.values())
    assert token not in stored and token[3:] not in stored
    assert hash_token(token) in stored


def test_verify(Session):
    with Session.begin() as s:
        token = create_token(s, "alice")
    with Session.begin() as s:
        row = verify_token(s, token)
        assert row is not None and row.name == "alice" and row.last_used_at is not None
        first_use = row.last_used_at
    with Session.begin() as s:  # used again within a minute: no write
        assert verify_token(s, f"  {token}\n").last_used_at == first_use
        s.get(ApiToken, row.id).last_used_at = first_use - timedelta(minutes=5)
    with Session.begin() as s:  # later: refreshed
        assert verify_token(s, token).last_used_at > first_use - timedelta(minutes=5)
    with Session.begin() as s:
        for wrong in (None, "", token[:-1], token + "x", "em_" + "A" * 43, hash_token(token)):
            assert verify_token(s, wrong) is None


def test_revoke_and_reuse_a_name(Session):
    with Session.begin() as s:
        old = create_token(s, "ci")
        with pytest.raises(TokenError, match="revoke it first"):
            create_token(s, "ci")
    with Session.begin() as s:
        assert revoke_token(s, "ci") == 1
        assert revoke_token(s, "ci") == 0
    with Session.begin() as s:
        assert verify_token(s, old) is None
        new = create_token(s, "ci")
    with Session.begin() as s:
        assert verify_token(s, new).name == "ci"
        assert [(t.name, t.revoked) for t in list_tokens(s)] == [("ci", True), ("ci", False)]
        assert len(list_tokens(s, include_revoked=False)) == 1


@pytest.mark.parametrize("name", ["", " ", "a b", "-x", "x" * 101, "name;drop"])
def test_bad_names_are_refused(Session, name):
    with pytest.raises(TokenError, match="not valid"), Session.begin() as s:
        create_token(s, name)


def test_cli_token_commands(db_url, capsys):
    # `token create` migrates a fresh database itself
    assert main(["token", "create", "alice", "--database-url", db_url]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("em_") and "\n" not in token  # stdout: the token alone, once
    assert "cannot be shown again" in err
    engine = make_engine(db_url)
    with session_factory(engine).begin() as s:
        assert verify_token(s, token).name == "alice"

    assert main(["token", "create", "alice", "--database-url", db_url]) == 1
    assert "revoke it first" in capsys.readouterr().err
    assert main(["token", "list", "--database-url", db_url]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing and token not in listing
    assert main(["token", "revoke", "alice", "--database-url", db_url]) == 0
    assert main(["token", "revoke", "alice", "--database-url", db_url]) == 1
    assert "no active token" in capsys.readouterr().err
    with session_factory(engine).begin() as s:
        assert verify_token(s, token) is None
        assert s.scalars(select(ApiToken.revoked)).all() == [True]
    engine.dispose()
