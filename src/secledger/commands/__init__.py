"""CLI commands by area; each module defines click commands that ``secledger.cli`` registers."""
