"""``secledger`` run as users run it: a process of its own, with only the given environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_secledger(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``secledger ARGS`` with ``PATH`` and ``env`` as its whole environment."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "secledger"), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
