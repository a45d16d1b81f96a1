#!/usr/bin/env bash
# Install the system tools bench/run.py compares deltalog with, when missing:
# rsync, ssh + sshd (a throwaway sshd on 127.0.0.1 carries every SSH transfer),
# scp, curl, and GNU time. Needs root and apt-get; the venv comes from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
command -v rsync >/dev/null || missing="$missing rsync"
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v ssh >/dev/null && command -v scp >/dev/null && command -v ssh-keygen >/dev/null || missing="$missing openssh-client"
command -v curl >/dev/null || missing="$missing curl"
[ -x /usr/bin/time ] || missing="$missing time"
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "bench/setup.sh: please install:$missing (as root, with apt-get)" >&2
        exit 1
    fi
    echo "installing:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
echo "bench tools ready: $(rsync --version | head -1); $(ssh -V 2>&1); $(curl --version | head -1)"
