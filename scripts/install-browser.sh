#!/usr/bin/env bash
# Install Debian's Chromium for the web-page test (tests/test_web_page.py).
# Playwright drives it through executable_path=/usr/bin/chromium, so no `playwright install`
# (which would download a browser build) is needed. Needs root (apt-get); CI runs as root.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium
/usr/bin/chromium --version
