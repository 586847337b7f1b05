#!/usr/bin/env bash
# The browser test drives Debian's chromium through Playwright (never `playwright
# install`, which downloads a browser build). Install it when missing and allowed.
set -euo pipefail
browser=${SECLEDGER_CHROMIUM:-/usr/bin/chromium}
if [ -x "$browser" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser test (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  exit 0
fi
echo "error: the browser test needs $browser (Debian's chromium package)." >&2
echo "       install it with: sudo apt-get install chromium" >&2
echo "       or point SECLEDGER_CHROMIUM at a Chromium binary" >&2
exit 1
