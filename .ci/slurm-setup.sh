#!/usr/bin/env bash
# Root-level preparation for tests/test_slurm.py on a fresh Debian 12 CI machine.
#
# Installs the Slurm daemons, client tools and munge. Nothing is started and no
# configuration is written here: the test starts its own single-node cluster
# (tests/slurm/cluster.py) and stops it again. slurmdbd is deliberately not
# installed: the profile must work on sites without job accounting.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-setup.sh: must run as root (apt-get, daemons, /etc/slurm)" >&2
    exit 1
fi

packages=(slurmctld slurmd slurm-client munge)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Debian packages enable and try to start the daemons with the distribution's
# (absent) configuration; the test runs its own, so make sure none is left running.
for unit in slurmctld slurmd munge; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$unit" 2>/dev/null; then
        systemctl stop "$unit"
    fi
done

slurmd -V
