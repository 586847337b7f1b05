"""Every integrity command has help with an example and an entry in docs/integrity.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from secledger.cli import main

DOC = (Path(__file__).parents[1] / "docs" / "integrity.md").read_text()


@pytest.mark.parametrize("command", ["verify", "rebuild", "keygen", "checkpoint"])
def test_command_has_an_example_and_docs(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"secledger {command}" in result.output
    assert f"`secledger {command}" in DOC
