#!/bin/bash
# Install what hyperd needs on Debian 12, as root: the apt packages, then a venv in .venv with hyperd and
# its test extra. Shared by scripts/setup.sh (the README's first command) and .ci/run. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 busybox-static linux-image-amd64 python3 python3-venv python3-pip
              docker-registry skopeo apache2-utils curl iproute2 iptables ca-certificates)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
fi

# Debian's python3 explicitly: another python3 (pyenv, ...) may come first on PATH.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi

# (capture first: `pip show | grep -q` fails under pipefail when grep exits early and pip gets SIGPIPE)
shown=$(.venv/bin/pip show hyperd 2>/dev/null || true)
if grep -q '^Editable project location:' <<<"$shown"; then
    # a developer's editable install: keep it editable (a plain install would shadow the working tree)
    .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
else
    .venv/bin/pip install -q '.[test]'
fi
unset shown
# Write Twisted's plugin cache now, while we may write site-packages (the daemon may not).
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
