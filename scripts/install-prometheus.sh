#!/usr/bin/env bash
# Install Prometheus (Debian package) where it is missing; does nothing when it is already there.
# Tests and `dashboards/` need the `prometheus` and `promtool` binaries; nothing here starts a server.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus: $(prometheus --version 2>&1 | head -n1)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus.sh: no apt-get here; install Prometheus >= 2.40 by hand (prometheus.io/download)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
# The package's own service is not needed: the suite starts Prometheus on 127.0.0.1 itself.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
echo "prometheus: $(prometheus --version 2>&1 | head -n1)"
