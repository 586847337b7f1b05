"""``secledger user``: password hashes and the users file for the dashboard."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from secledger.config import Settings
from secledger.dashboard.auth import (
    hash_password,
    read_users_file,
    verify_password,
    write_users_file,
)
from secledger.errors import ConfigError
from secledger.keyfiles import ensure_secret_file


def _users_path() -> Path:
    # The parent group built Settings; commands read it from the click context.
    context = click.get_current_context().find_root().obj
    return Path(context.settings.users_path)


def _ask_password(password_stdin: bool) -> str:
    if password_stdin:
        line: str = sys.stdin.readline()
        password = line.rstrip("\n")
    elif not sys.stdin.isatty():
        # The prompt would read it unhidden from the pipe, with a GetPassWarning.
        raise click.UsageError(
            "standard input is not a terminal: pass --password-stdin to read the password from it"
        )
    else:
        password = str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    if len(password) < 12:
        raise click.BadParameter("use a password of at least 12 characters", param_hint="password")
    return password


@click.group(name="user")
def user_group() -> None:
    """Dashboard users: hash passwords, add users to the users file.

    \b
    Example:
      secledger user add alice
      secledger user hash-password
    """


@user_group.command(name="hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def hash_password_command(password_stdin: bool) -> None:
    """Print an scrypt hash for SECLEDGER_USERS (name:hash) or the users file.

    A password must have at least 12 characters.

    \b
    Example:
      secledger user hash-password
      printf '%s\\n' "$PASSWORD" | secledger user hash-password --password-stdin
      export SECLEDGER_USERS="alice:$(secledger user hash-password)"  # then serve as usual
    """
    click.echo(hash_password(_ask_password(password_stdin)))


@user_group.command(name="add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def add_command(name: str, password_stdin: bool) -> None:
    """Add NAME (or replace its password) in the users file (SECLEDGER_USERS_FILE).

    The file defaults to SECLEDGER_DATA_DIR/users and is created with mode 0600. A
    password must have at least 12 characters. A running `secledger serve` reads the
    file at start: restart it to apply.

    \b
    Example:
      secledger user add alice
      printf '%s\\n' "$PASSWORD" | secledger user add bob --password-stdin
    """
    if not name or ":" in name or any(c.isspace() for c in name):
        raise click.BadParameter("a user name has no colon and no white space", param_hint="NAME")
    path = _users_path()
    try:
        users = read_users_file(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    verb = "updated" if name in users else "added"
    users[name] = hash_password(_ask_password(password_stdin))
    try:
        write_users_file(path, users)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from exc
    click.echo(f"{verb} {name} in {path}")


DEMO_USER = "demo"


def ensure_demo_user(settings: Settings) -> Path:
    """Give `secledger demo` a dashboard login, once: user ``demo``, a random password
    kept in ``data_dir/demo-password`` (0600). Returns that file's path; re-running
    keeps the password and rewrites nothing."""
    path = settings.data_dir / "demo-password"
    password = ensure_secret_file(path, 18)
    users = read_users_file(settings.users_path)
    known = users.get(DEMO_USER)
    if known is None or not verify_password(password, known):
        users[DEMO_USER] = hash_password(password)
        write_users_file(settings.users_path, users)
    return path
