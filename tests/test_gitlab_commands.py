"""The CLI: gitlab connect/check, backfill and reconcile, with the fake API and real PostgreSQL."""

from __future__ import annotations

import tomllib

from click.testing import CliRunner

from apistory import Story
from fakegitlab import TOKEN
from secledger.cli import main

pytest_plugins = ("gitlabfixtures",)
RECEIVER = "https://secledger.example.com/webhooks/gitlab"


def invoke(database_url, fake, *args, **env):
    environment = {
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_GITLAB_URL": fake.url,
        "SECLEDGER_GITLAB_TOKEN": TOKEN,
        "SECLEDGER_LOG_LEVEL": "warning",
    } | env
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=False)


def test_connect_refuses_a_file_the_environment_would_override(database_url, fake, tmp_path):
    """serve reads SECLEDGER_WEBHOOK_SECRETS before the file: the hook's secret would be
    refused (401) at every delivery until GitLab disabled the hook."""
    config = tmp_path / "secledger.toml"
    args = ("gitlab", "connect", "--project", "14", "--url", RECEIVER, "--config", str(config))
    # As the settings read them: the variable in any case and even empty; its _FILE as
    # spelt and not empty.
    for variable, value in (
        ("SECLEDGER_WEBHOOK_SECRETS", "s3cret"),
        ("SECLEDGER_WEBHOOK_SECRETS", ""),
        ("secledger_webhook_secrets", "s3cret"),
        ("SECLEDGER_WEBHOOK_SECRETS_FILE", "/run/secrets/hook"),
    ):
        result = invoke(database_url, fake, *args, **{variable: value})
        assert result.exit_code == 1, (variable, value, result.output)
        assert f"{variable.upper()} is set, and the environment wins over" in result.output
    assert fake.projects[14].hooks == []
    assert not config.exists()


def test_connect_registers_a_merge_request_hook_and_stores_the_secret(
    database_url, fake, tmp_path
) -> None:
    config = tmp_path / "secledger.toml"
    config.write_text('# ours\nwebhook_secrets = ["old-secret"]\nport = 8081\n')
    result = invoke(
        database_url,
        fake,
        "gitlab",
        "connect",
        "--project",
        "acme/payments",
        "--url",
        RECEIVER,
        "--config",
        str(config),
    )
    assert result.exit_code == 0, result.output
    [hook] = fake.projects[14].hooks
    assert hook["url"] == RECEIVER
    assert hook["merge_requests_events"] is True
    assert hook["push_events"] is False
    assert hook["enable_ssl_verification"] is True
    stored = tomllib.loads(config.read_text())
    assert stored["port"] == 8081
    assert stored["webhook_secrets"][0] == "old-secret"
    assert stored["webhook_secrets"][1] == fake.hook_tokens[hook["id"]]
    assert len(stored["webhook_secrets"][1]) >= 32
    assert stored["webhook_secrets"][1] not in result.output
    assert "# ours" in config.read_text()
    assert config.stat().st_mode & 0o077 == 0

    again = invoke(
        database_url,
        fake,
        "gitlab",
        "connect",
        "--project",
        "14",
        "--url",
        RECEIVER,
        "--config",
        str(config),
    )
    assert again.exit_code == 1
    assert "already has hook" in again.output
    assert len(fake.projects[14].hooks) == 1


def test_the_first_connect_creates_the_file_secledger_config_names(
    database_url, fake, tmp_path
) -> None:
    """docs/gitlab-api.md's example on a new installation: settings were read from the
    file SECLEDGER_CONFIG names before connect could write it, and it did not exist."""
    config = tmp_path / "secledger.toml"
    args = ("gitlab", "connect", "--project", "14", "--url", RECEIVER)
    result = invoke(database_url, fake, *args, SECLEDGER_CONFIG=str(config))
    assert result.exit_code == 0, result.output
    [hook] = fake.projects[14].hooks
    assert tomllib.loads(config.read_text())["webhook_secrets"] == [fake.hook_tokens[hook["id"]]]
    assert config.stat().st_mode & 0o077 == 0
    assert result.output.rstrip().endswith("restart `secledger serve`")


def test_connect_to_another_file_says_serve_must_read_it(database_url, fake, tmp_path) -> None:
    """serve reads only SECLEDGER_CONFIG's file: a secret added elsewhere is refused at
    every delivery, and GitLab disables the hook after four."""
    config = tmp_path / "conn.toml"
    args = ("gitlab", "connect", "--project", "14", "--url", RECEIVER, "--config", str(config))
    result = invoke(database_url, fake, *args)
    assert result.exit_code == 0, result.output
    assert f"restart `secledger serve` with SECLEDGER_CONFIG={config}" in result.output


def test_connect_says_when_it_cannot_write_the_file(database_url, fake, tmp_path) -> None:
    (tmp_path / "etc").write_text("a file, not a directory")
    config = tmp_path / "etc" / "secledger.toml"
    args = ("gitlab", "connect", "--project", "14", "--url", RECEIVER, "--config", str(config))
    result = invoke(database_url, fake, *args)
    assert result.exit_code == 1
    assert f"Error: cannot write {config}: " in result.output


def test_a_hook_gitlab_refuses_leaves_no_secret_behind(database_url, fake, tmp_path) -> None:
    """The secret is stored before GitLab is asked; when GitLab refuses the hook, a
    secret the receiver would accept, with no hook behind it, is taken out again."""
    config = tmp_path / "secledger.toml"
    config.write_text('webhook_secrets = ["old-secret"]\n')
    result = invoke(
        database_url,
        fake,
        "gitlab",
        "connect",
        "--group",
        "acme",  # the fake answers 404 to a group hook
        "--url",
        RECEIVER,
        "--config",
        str(config),
    )
    assert result.exit_code == 1
    assert tomllib.loads(config.read_text())["webhook_secrets"] == ["old-secret"]


def test_a_lost_answer_to_the_hook_creation_makes_one_hook_not_two(
    database_url, fake, tmp_path
) -> None:
    """A 502 may come after GitLab created the hook: a retry made a second one (every
    event then arrived twice). It is not retried; GitLab's list says what happened."""
    config = tmp_path / "secledger.toml"
    config.write_text('webhook_secrets = ["old-secret"]\n')
    args = ("gitlab", "connect", "--project", "14", "--url", RECEIVER, "--config", str(config))
    fake.hook_post_502.append("after")
    created = invoke(database_url, fake, *args)
    assert created.exit_code == 0, created.output
    [hook] = fake.projects[14].hooks
    assert f"hook {hook['id']}" in created.output
    assert tomllib.loads(config.read_text())["webhook_secrets"] == [
        "old-secret",
        fake.hook_tokens[hook["id"]],
    ]

    fake.projects[14].hooks.clear()
    config.write_text('webhook_secrets = ["old-secret"]\n')
    fake.hook_post_502.append("before")
    refused = invoke(database_url, fake, *args)
    assert refused.exit_code == 1
    assert "502" in refused.output
    assert "the hook is not listed (yet): the secret stays" in refused.output
    assert fake.projects[14].hooks == []
    # GitLab may still be creating it behind a proxy's timeout: were the secret taken
    # out, that hook's every delivery would be refused.
    kept = tomllib.loads(config.read_text())["webhook_secrets"]
    assert kept[0] == "old-secret" and len(kept) == 2


def test_backfill_and_reconcile_refuse_a_period_that_ends_before_it_starts(
    database_url, fake, engine
) -> None:
    """As report and evidence do: reconcile would store a passing check of nothing in
    the append-only reconciliations table."""
    for command in ("backfill", "reconcile"):
        args = (command, "--project", "14", "--since", "2025-06-01", "--until", "2025-01-01")
        result = invoke(database_url, fake, *args)
        assert result.exit_code == 2, result.output
        assert "--since must be before --until" in result.output
    assert fake.seen == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM reconciliations").scalar_one() == 0


def test_check_reports_two_hooks_that_deliver_to_one_url(database_url, fake) -> None:
    """What a retried creation used to leave behind: every event delivered twice."""
    for hook_id in (700, 701):
        fake.projects[14].hooks.append(
            {"id": hook_id, "url": RECEIVER, "merge_requests_events": True}
        )
    result = invoke(database_url, fake, "gitlab", "check", "--project", "14")
    assert result.exit_code == 1
    assert (
        "problem: hook 701 also delivers to this URL: each event arrives 2 times"
        " (delete all but one in GitLab)"
    ) in result.output
    assert "problem: hook 700 also delivers" in result.output


def test_check_reports_last_success_and_resendable_failures(database_url, fake) -> None:
    project = fake.projects[14]
    project.hooks.append(
        {
            "id": 5,
            "url": RECEIVER,
            "merge_requests_events": True,
            "enable_ssl_verification": True,
            "alert_status": "executable",
        }
    )
    project.hook_events[5] = [
        {
            "id": 31,
            "trigger": "merge_request_hooks",
            "response_status": "500",
            "created_at": "2025-08-06T10:00:00.000Z",
        },
        {
            "id": 30,
            "trigger": "merge_request_hooks",
            "response_status": "200",
            "created_at": "2025-08-06T09:00:00.000Z",
        },
    ]
    result = invoke(database_url, fake, "gitlab", "check", "--project", "14")
    assert result.exit_code == 1
    assert "hook 5 -> " + RECEIVER + ": enabled" in result.output
    assert "last successful delivery: 2025-08-06T09:00:00.000Z" in result.output
    assert "event 31 status 500" in result.output
    # The whole URL, ready for curl: the path alone lacked the API's base.
    assert f"resend: POST {fake.url}/api/v4/projects/14/hooks/5/events/31/resend" in result.output

    # Resent from GitLab's page: a later delivery with the same Idempotency-Key went
    # through. It no longer counts as a failure (it did, for the 7 days GitLab keeps it).
    project.hook_events[5][0]["request_headers"] = {"Idempotency-Key": "k-31"}
    resent = {
        "id": 32,
        "trigger": "merge_request_hooks",
        "response_status": "200",
        "created_at": "2025-08-06T10:05:00.000Z",
        "request_headers": {"idempotency-key": "k-31"},
    }
    project.hook_events[5].insert(0, resent)
    again = invoke(database_url, fake, "gitlab", "check", "--project", "14")
    assert again.exit_code == 0, again.output
    assert "event 31 status 500 2025-08-06T10:00:00.000Z (resent since, and delivered)" in (
        again.output
    )
    assert "problem" not in again.output

    project.hook_events[5] = project.hook_events[5][2:]
    assert invoke(database_url, fake, "gitlab", "check", "--project", "14").exit_code == 0


def test_check_finds_failures_older_than_the_newest_hundred_deliveries(database_url, fake) -> None:
    """A busy hook's newest page may be an hour of deliveries; GitLab keeps a week, and
    does not resend what failed. A timeout has no status code: found among the newest."""
    project = fake.projects[14]
    project.hooks.append({"id": 6, "url": RECEIVER, "merge_requests_events": True})

    def event(n: int, status: str) -> dict[str, object]:
        stamp = f"2025-08-{6 + n // 1000:02d}T{n % 1000 // 60:02d}:{n % 60:02d}:00.000Z"
        return {
            "id": n,
            "trigger": "merge_request_hooks",
            "response_status": status,
            "created_at": stamp,
        }

    newest_first = [event(n, "200") for n in range(2000, 1850, -1)]
    newest_first.insert(3, event(9999, "internal error"))
    newest_first += [event(n, "502") for n in (1200, 1100)] + [event(1000, "404")]
    project.hook_events[6] = newest_first
    result = invoke(database_url, fake, "gitlab", "check", "--project", "14")
    assert result.exit_code == 1, result.output
    failed = [line.split()[2] for line in result.output.splitlines() if "failed: event" in line]
    assert failed == ["9999", "1200", "1100", "1000"], result.output
    assert "problem: 4 failed deliveries in the last 7 days" in result.output


def test_check_says_when_there_is_no_hook(database_url, fake) -> None:
    result = invoke(database_url, fake, "gitlab", "check", "--group", "acme")
    assert result.exit_code == 1
    assert "no secledger hook" in result.output


def test_backfill_and_reconcile_commands(database_url, fake) -> None:
    Story(iid=1).publish(fake)
    Story(iid=2, decision=("close", "dave", "2025-08-07 09:00:00 UTC")).publish(fake)
    result = invoke(database_url, fake, "reconcile", "--group", "acme", "--since", "2025-08-01")
    assert result.exit_code == 1
    assert "missing 2" in result.output
    result = invoke(database_url, fake, "backfill", "--group", "acme", "--since", "2025-08-01")
    assert result.exit_code == 0, result.output
    assert "2 security merge requests found" in result.output
    # The progress display is stderr's: piped, stdout is the summary alone.
    assert result.stdout.startswith("2 security merge requests found"), repr(result.stdout)
    result = invoke(database_url, fake, "reconcile", "--group", "acme", "--since", "2025-08-01")
    assert result.exit_code == 0, result.output
    assert "missing 0, different 0, extra 0" in result.output
    assert TOKEN not in result.output


def test_label_history_option_of_both_commands(database_url, fake) -> None:
    Story(iid=5, relabel=("frontend", "bob", "2025-08-05 20:30:00 UTC")).publish(fake)
    since = ("--group", "acme", "--since", "2025-08-01")
    assert invoke(database_url, fake, "reconcile", *since).exit_code == 0  # not seen at all
    result = invoke(database_url, fake, "reconcile", *since, "--label-history")
    assert result.exit_code == 1
    assert "missing 1" in result.output
    result = invoke(database_url, fake, "backfill", *since, "--label-history")
    assert result.exit_code == 0, result.output
    assert "1 security merge requests found" in result.output
    result = invoke(database_url, fake, "reconcile", *since, "--label-history")
    assert result.exit_code == 0, result.output
    assert "missing 0, different 0, extra 0" in result.output


def test_missing_token_is_a_clear_error(database_url, fake) -> None:
    result = invoke(
        database_url, fake, "enrich", SECLEDGER_GITLAB_TOKEN="", SECLEDGER_GITLAB_URL=fake.url
    )
    assert result.exit_code == 1
    assert "SECLEDGER_GITLAB_TOKEN" in result.output


def test_every_new_command_has_help_with_an_example() -> None:
    for args in (
        ["backfill"],
        ["reconcile"],
        ["enrich"],
        ["gitlab"],
        ["gitlab", "connect"],
        ["gitlab", "check"],
    ):
        result = CliRunner().invoke(main, [*args, "--help"], env={"SECLEDGER_LOG_LEVEL": "warning"})
        assert result.exit_code == 0
        assert "Example:" in result.output


def test_a_hook_whose_temporary_disabling_is_over_is_enabled() -> None:
    """GitLab keeps ``disabled_until``'s past time until the next successful delivery;
    the hook delivers again meanwhile (``alert_status`` says ``executable``). It was
    reported "disabled (executable)"."""
    from secledger.hooks import HookHealth  # noqa: PLC0415

    base = {"merge_requests_events": True, "enable_ssl_verification": True}
    over = HookHealth(
        {**base, "alert_status": "executable", "disabled_until": "2025-01-01T00:00:00.000Z"}, None
    )
    assert over.enabled and over.problems == []
    held = HookHealth(
        {
            **base,
            "alert_status": "temporarily_disabled",
            "disabled_until": "2999-01-01T00:00:00.000Z",
        },
        None,
    )
    assert not held.enabled and held.problems == ["disabled (temporarily_disabled)"]
    assert not HookHealth({**base, "alert_status": "disabled"}, None).enabled
    # A GitLab that sends no alert_status: disabled_until tells it.
    assert HookHealth({**base, "disabled_until": "2025-01-01T00:00:00Z"}, None).enabled
    assert not HookHealth({**base, "disabled_until": "2999-01-01T00:00:00Z"}, None).enabled
    assert HookHealth(base, None).enabled
