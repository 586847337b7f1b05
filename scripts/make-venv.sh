#!/usr/bin/env bash
# Create the project's virtual environment. Debian splits `venv` out of its
# Python package, so on a fresh machine we install it when we are allowed to.
set -euo pipefail
python=${1:?python interpreter}
venv=${2:?venv directory}
if [ -z "$python" ]; then
  echo "error: no python3.11 or python3 found on PATH; install Python 3.11 or newer" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $python is $("$python" --version 2>&1); secledger needs Python 3.11 or newer" >&2
  exit 1
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
  rm -rf "$venv"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "installing python${minor}-venv with apt-get (Debian ships venv separately)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${minor}-venv"
    "$python" -m venv "$venv"
  else
    echo "error: '$python -m venv' failed; on Debian run: sudo apt-get install python3-venv" >&2
    exit 1
  fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
