#!/usr/bin/env bash
# Debian packages the tests drive from outside Python: chromium for the browser test
# (through Playwright, never `playwright install`, which downloads a browser build) and
# openssl for the evidence pack's signature steps. Installed when missing and allowed.
set -euo pipefail
browser=${SECLEDGER_CHROMIUM:-/usr/bin/chromium}
missing=()
[ -x "$browser" ] || missing+=(chromium fonts-dejavu-core)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} = 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's ${missing[*]} for the tests (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "error: the tests need Debian's ${missing[*]}." >&2
echo "       install with: sudo apt-get install ${missing[*]}" >&2
echo "       (or point SECLEDGER_CHROMIUM at a Chromium binary)" >&2
exit 1
