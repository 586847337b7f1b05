"""``secledger gitlab connect`` and ``gitlab check``: the webhook, set up and watched."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from secledger import hooks
from secledger.commands.backfill import _api, _scopes, edge, scope_options
from secledger.config import variable_for
from secledger.errors import SecledgerError

if TYPE_CHECKING:
    from secledger.cli import Context


@click.group(name="gitlab")
def gitlab_group() -> None:
    """Register secledger's webhook in GitLab and check that it delivers.

    \b
    Example:
      secledger gitlab connect --group acme --config /etc/secledger.toml \\
        --url https://secledger.example.com/webhooks/gitlab
      secledger gitlab check --group acme
    """


@gitlab_group.command()
@scope_options
@click.option("--url", required=True, help="The receiver's public https URL.")
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: os.environ.get("SECLEDGER_CONFIG"),
    help="TOML file to add the new secret to (default: SECLEDGER_CONFIG).",
)
@click.pass_obj
def connect(
    context: Context,
    projects: tuple[str, ...],
    groups: tuple[str, ...],
    url: str,
    config: Path | None,
) -> None:
    """Register a webhook: merge request events only, SSL verification on, a new secret.

    The secret is generated, added to webhook_secrets in the configuration file
    (mode 0600) and never printed. Restart `serve` to load it. Refuses while
    SECLEDGER_WEBHOOK_SECRETS (or its _FILE) is set: the environment wins over the
    file, and serve would not read the new secret.

    \b
    Example:
      SECLEDGER_CONFIG=/etc/secledger.toml secledger gitlab connect --project acme/payments \\
        --url https://secledger.example.com/webhooks/gitlab
    """
    if config is None:
        raise click.UsageError("name the configuration file with --config or SECLEDGER_CONFIG")
    overriding = variable_for("webhook_secrets", os.environ)
    if overriding:
        # The environment wins over the file: serve would never read the new secret, and
        # GitLab disables a hook after four refused deliveries.
        raise click.ClickException(
            f"{overriding} is set, and the environment wins over {config}: serve would"
            " not read the secret added there. Move its tokens into webhook_secrets in the"
            " file and unset it (in serve's environment too), then run connect again"
        )
    named = os.environ.get("SECLEDGER_CONFIG")
    if named and Path(named) == config and not config.exists():
        # Settings are read from it before the secret is written: the first connect of a
        # new installation found it missing and stopped.
        _create_config(config)
    api = _api(context)
    for scope in _scopes(projects, groups):
        try:
            hook = hooks.connect(api, scope, url, Path(config))
        except SecledgerError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(f"cannot write {config}: {exc.strerror or exc}") from exc
        click.echo(f"{scope}: hook {hook.get('id')} delivers merge request events to {url}")
    restart = "restart `secledger serve`"
    if not named or Path(named) != config:
        # serve reads only the file SECLEDGER_CONFIG names; GitLab disables a hook after
        # four refused deliveries.
        restart = f"restart `secledger serve` with SECLEDGER_CONFIG={config}"
    click.echo(f"secret token added to webhook_secrets in {config}; {restart}")


def _create_config(path: Path) -> None:
    """An empty configuration file, readable by its owner only."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    except OSError as exc:
        raise click.ClickException(f"cannot create {path}: {exc.strerror or exc}") from exc


@gitlab_group.command()
@scope_options
@click.option("--url", default=None, help="The receiver URL (default: any */webhooks/gitlab).")
@click.pass_obj
def check(
    context: Context, projects: tuple[str, ...], groups: tuple[str, ...], url: str | None
) -> None:
    """Say whether the hook exists, is enabled, when it last delivered, and what failed.

    Failed deliveries of the last 7 days can be resent with GitLab's resend endpoint
    (shown); secledger records a resent delivery once. Exits 1 when something is wrong.

    \b
    Example:
      secledger gitlab check --project acme/payments
    """
    api = _api(context)
    trouble = False
    for scope in _scopes(projects, groups):
        with edge():
            report = hooks.check(api, scope, url)
        if not report:
            click.echo(f"{scope}: no secledger hook; run `secledger gitlab connect`")
            trouble = True
        for health in report:
            trouble |= _print_health(api.client.api_url, scope.path, health)
    if trouble:
        raise SystemExit(1)


def _print_health(api_url: str, path: str, health: hooks.HookHealth) -> bool:
    hook = health.hook
    state = "enabled" if health.enabled else "DISABLED"
    click.echo(f"hook {hook.get('id')} -> {hook.get('url')}: {state}")
    last = health.last_success
    when = (last.get("created_at") or f"event {last.get('id')}") if last else "never (7 days)"
    click.echo(f"  last successful delivery: {when}")
    for event in health.failures:
        line = (
            f"  failed: event {event.get('id')} status {event.get('response_status')} "
            f"{event.get('created_at') or ''}"
        )
        if event.get("id") in health.resent:
            click.echo(f"{line} (resent since, and delivered)")
        else:
            click.echo(
                f"{line} resend: POST {api_url}{path}/hooks/{hook.get('id')}"
                f"/events/{event.get('id')}/resend"
            )
    for problem in health.problems:
        click.echo(f"  problem: {problem}")
    return bool(health.problems)
