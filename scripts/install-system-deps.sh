#!/usr/bin/env bash
# Installs the system packages the Slurm integration tests need (slurmctld, slurmd, the
# client commands, munge, and iproute2 for the two virtual nodes' network namespaces) from
# Debian's archive. Idempotent: prints what it found and
# does nothing when every binary is already present. Needs root (CI runs as root).
set -euo pipefail

# Binary -> Debian 12 package that provides it.
declare -A PROVIDER=(
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [sbatch]=slurm-client
    [munged]=munge
    [ip]=iproute2
)

missing=()
for bin in slurmctld slurmd sbatch munged ip; do
    if command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]]; then
        echo "install-system-deps: $bin present"
    else
        missing+=("${PROVIDER[$bin]}")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-system-deps: nothing to do"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-system-deps: need root to install: ${missing[*]} (Slurm tests will be skipped)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: no apt-get; install by hand: ${missing[*]}" >&2
    exit 1
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package scripts must not start the system daemons: the tests start their own instances
# with their own config. policy-rc.d (exit 101 = "not allowed") is removed again on exit,
# unless one existed before us.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    own_policy=1
fi
trap '[[ $own_policy -eq 1 ]] && rm -f "$policy"' EXIT

apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-system-deps: installed ${missing[*]}"
