"""Secrets from files, never echoed; database URLs keep their TLS parameters."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr, ValidationError
from sqlalchemy import text
from sqlalchemy.engine import make_url

from secledger.cli import describe, main
from secledger.config import Settings, secret_field_names
from secledger.errors import ConfigError
from secledger.store import db

SECRET = "file-only-secret-7f3a"


def test_every_secret_field_can_come_from_a_file() -> None:
    assert {"database_url", "webhook_secrets", "webhook_signing_secrets"} <= set(
        secret_field_names(Settings)
    )


def test_webhook_secrets_file_holds_one_secret_per_line(tmp_path, monkeypatch) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{SECRET}\nsecond-token\n")
    monkeypatch.setenv("SECLEDGER_WEBHOOK_SECRETS_FILE", str(path))
    assert Settings().secret_values() == [SECRET.encode(), b"second-token"]


def test_database_url_file_is_read_without_its_trailing_newline(
    tmp_path, monkeypatch, database_url
) -> None:
    path = tmp_path / "dburl"
    path.write_text(database_url + "\n")
    monkeypatch.setenv("SECLEDGER_DATABASE_URL_FILE", str(path))
    settings = Settings()
    assert settings.database_url is not None
    engine = db.create(db.resolve(settings).url, pool_size=1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    engine.dispose()


def test_variable_and_its_file_together_are_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "tokens"
    path.write_text(SECRET)
    monkeypatch.setenv("SECLEDGER_WEBHOOK_SECRETS_FILE", str(path))
    monkeypatch.setenv("SECLEDGER_WEBHOOK_SECRETS", "other")
    with pytest.raises(ConfigError, match="not both"):
        Settings()


def test_an_empty_variable_beside_its_file_is_refused_too(tmp_path, monkeypatch) -> None:
    """A template's blank SECLEDGER_READ_TOKEN won over the file: its token was dropped."""
    path = tmp_path / "token"
    path.write_text(SECRET)
    monkeypatch.setenv("SECLEDGER_READ_TOKEN_FILE", str(path))
    monkeypatch.setenv("SECLEDGER_READ_TOKEN", "")
    with pytest.raises(ConfigError, match=r"not both \(SECLEDGER_READ_TOKEN is set, empty\)"):
        Settings()


@pytest.mark.parametrize("content", [None, "\n"])
def test_missing_or_empty_secret_file_names_the_file_only(tmp_path, monkeypatch, content) -> None:
    path = tmp_path / "absent"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("SECLEDGER_WEBHOOK_SIGNING_SECRETS_FILE", str(path))
    with pytest.raises(ConfigError, match=str(path)):
        Settings()


def test_per_instance_secrets_can_come_from_files(tmp_path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    config = tmp_path / "secledger.toml"
    config.write_text(
        f'[[webhook_sources]]\ninstance = "https://gitlab.example.com"\ntokens_file = "{token}"\n'
    )
    monkeypatch.setenv("SECLEDGER_CONFIG", str(config))
    source = Settings().webhook_sources[0]
    assert [t.get_secret_value() for t in source.tokens] == [SECRET]


def test_configuration_errors_never_echo_a_secret(monkeypatch) -> None:
    # A list where a string is expected makes pydantic report the input value.
    with pytest.raises(ValidationError) as caught:
        Settings(webhook_sources=[{"instance": "https://x.example", "tokens": [[SECRET]]}])
    assert SECRET in str(caught.value)  # pydantic itself would leak it...
    assert SECRET not in describe(caught.value)  # ...describe() does not
    assert "webhook_sources.0.tokens" in describe(caught.value)


def test_cli_reports_a_bad_setting_without_its_value(monkeypatch) -> None:
    monkeypatch.setenv("SECLEDGER_DATABASE_URL", SECRET)
    monkeypatch.setenv("SECLEDGER_PORT", f"not-a-port-{SECRET}")
    result = CliRunner().invoke(main, ["ledger"])
    assert result.exit_code != 0
    assert "port" in result.output
    assert SECRET not in result.output


def test_a_database_url_that_does_not_parse_is_named_not_shown(monkeypatch) -> None:
    """A password typed where the port belongs: the URL parser's own error quotes it."""
    for setting in ("SECLEDGER_DATABASE_URL", "SECLEDGER_MIGRATION_DATABASE_URL"):
        monkeypatch.setenv("SECLEDGER_DATABASE_URL", "postgresql://app@db/secledger")
        monkeypatch.setenv(setting, f"postgresql://secledger:{SECRET}/secledger")
        with pytest.raises(ConfigError) as caught:
            settings = Settings()
            db.migration_url(settings)
            db.resolve(settings)
        assert setting in str(caught.value)
        assert SECRET not in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        monkeypatch.delenv(setting)


def test_a_log_level_is_one_of_the_documented_names(monkeypatch) -> None:
    """A typo used to fall back to info in silence."""
    monkeypatch.setenv("SECLEDGER_LOG_LEVEL", "WARNING")
    assert Settings().log_level == "warning"
    monkeypatch.setenv("SECLEDGER_LOG_LEVEL", "verbose")
    result = CliRunner().invoke(main, ["ledger"])
    assert result.exit_code != 0
    assert "log_level" in result.output


def test_help_shows_no_configured_secret(monkeypatch) -> None:
    monkeypatch.setenv("SECLEDGER_WEBHOOK_SECRETS", SECRET)
    for args in (["--help"], ["serve", "--help"], ["ledger", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0
        assert SECRET not in result.output


def test_tls_parameters_survive_every_url_rewrite() -> None:
    url = (
        "postgresql://app:pw%40x@db.internal:5432/secledger"
        "?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem&sslcert=/c.pem&sslkey=/k.pem"
    )
    wanted = {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/ca.pem",
        "sslcert": "/c.pem",
        "sslkey": "/k.pem",
    }
    rewritten = db.sqlalchemy_url(url)
    assert dict(make_url(rewritten).query) == wanted | db.CONNECTION_DEFAULTS
    for given in (url, rewritten):
        options = conninfo_to_dict(db.conninfo(given))
        assert {name: options[name] for name in wanted} == wanted
        assert (options["user"], options["password"], options["host"]) == (
            "app",
            "pw@x",
            "db.internal",
        )

    redacted = db.Database(url, embedded=False).redacted()
    assert "sslmode=verify-full" in redacted
    assert "pw" not in redacted


def test_several_hosts_reach_libpq_as_its_own_host_list() -> None:
    """docs/deployment.md's URL without a writer endpoint: the LISTEN connections (serve's
    follower, the sink, `watch`) are plain libpq ones, which read the URL's last ``host``
    alone, port and all, as one host name ("db2:5432"), and never connected."""
    url = "postgresql://secledger@/secledger?host=db1:5432&host=db2:5433&target_session_attrs=read-write"
    options = conninfo_to_dict(db.conninfo(url))
    assert (options["host"], options["port"]) == ("db1,db2", "5432,5433")
    assert options["target_session_attrs"] == "read-write"
    assert options["connect_timeout"] == db.CONNECTION_DEFAULTS["connect_timeout"]


def test_a_password_given_as_a_query_option_is_not_shown() -> None:
    """libpq takes ``?password=`` (and ``sslpassword``) too: ``serve``, ``db upgrade`` and
    ``demo`` print the redacted URL."""
    url = "postgresql://app@db:5432/ledger?password=S3CRETpw&sslpassword=K3Ypw&sslmode=require"
    redacted = db.Database(url, embedded=False).redacted()
    assert redacted == "postgresql://app@db:5432/ledger?sslmode=require"


def test_sslmode_reaches_libpq_on_a_real_connection(database_url) -> None:
    # "allow", not libpq's default, connects with or without TLS: over the embedded
    # server's Unix socket (where libpq ignores sslmode) and over TCP to a server without
    # TLS (SECLEDGER_TEST_DATABASE_URL). The connection shows the parameter was handed to
    # libpq unchanged.
    separator = "&" if "?" in database_url else "?"
    engine = db.create(database_url + separator + "sslmode=allow", pool_size=1)
    with engine.connect() as conn:
        dsn = conn.connection.dbapi_connection.info.dsn  # type: ignore[union-attr]
    engine.dispose()
    assert "sslmode=allow" in dsn


def test_secret_str_hides_webhook_secrets_in_reprs() -> None:
    settings = Settings(webhook_secrets=[SecretStr(SECRET)])
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_a_field_with_its_own_file_setting_keeps_that_mechanism() -> None:
    class WithOwnFile(Settings):
        api_token: SecretStr | None = None
        api_token_file: str | None = None
        read_token: SecretStr | None = None

    names = secret_field_names(WithOwnFile)
    assert "read_token" in names
    assert "api_token" not in names


@pytest.mark.parametrize("value", ["", "   ", "short-secret"])
def test_a_blank_or_short_session_secret_is_refused_without_echoing_it(monkeypatch, value) -> None:
    """A blank left in a template signed every cookie and form token with an empty key."""
    monkeypatch.setenv("SECLEDGER_SESSION_SECRET", value)
    result = CliRunner().invoke(main, ["ledger"])
    assert result.exit_code == 1
    assert "session_secret: Value error, must be at least 16 characters" in result.output
    assert not value.strip() or value not in result.output


def test_a_long_session_secret_is_taken(monkeypatch) -> None:
    monkeypatch.setenv("SECLEDGER_SESSION_SECRET", "0123456789abcdef")
    assert Settings().session_secret is not None
