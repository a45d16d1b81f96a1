"""A real sshd on 127.0.0.1 for the SSH transport tests (pytest fixture ``sshd``).

Starts ``sshd -D`` on a free port with a throwaway host key and a fresh
ed25519 client key in authorized_keys, and hands the tests the --ssh-command
and --remote-deltalog to reach it. The remote command runs this interpreter
(``python -m deltalog``), so the code under test is on both ends. Skipped,
with the reason, only when sshd or ssh is not installed (CI installs them:
``apt-get install -y openssh-server openssh-client``).
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest


def _find_sshd() -> str | None:
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.path.exists(candidate):
            return os.path.abspath(candidate)  # sshd refuses to start from a relative path
    return None


@dataclass
class Sshd:
    host: str
    port: int
    key: str
    ssh_command: str
    remote_deltalog: str

    def location(self, path) -> str:
        """``host:path`` for an absolute local path (the server runs on this machine)."""
        return f"{self.host}:{os.path.abspath(path)}"

    def cli_options(self) -> list[str]:
        return ["--ssh-command", self.ssh_command, "--remote-deltalog", self.remote_deltalog]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    daemon = _find_sshd()
    if daemon is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd/ssh not installed (apt-get install -y openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    os.chmod(d / "client_key", 0o600)
    port = _free_port()
    user = getpass.getuser()
    config = d / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers {user}
LogLevel ERROR
"""
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([daemon, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-300:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.skip("sshd did not start listening within 10 s")
            time.sleep(0.05)
    ssh_command = shlex.join([
        "ssh", "-p", str(port), "-i", str(d / "client_key"), "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        # One TCP+key exchange shared by every test's sessions (as a user's ControlMaster config would).
        "-o", "ControlMaster=auto", "-o", f"ControlPath={d / 'cm-%C'}", "-o", "ControlPersist=120",
    ])
    remote = f"{shlex.quote(sys.executable)} -m deltalog"
    info = Sshd("127.0.0.1", port, str(d / "client_key"), ssh_command, remote)
    # One real login proves the setup (a broken environment skips instead of failing every test).
    probe = subprocess.run([*shlex.split(ssh_command), "-T", "-o", "BatchMode=yes", "127.0.0.1", f"{remote} --version"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        proc.kill()
        pytest.fail(f"sshd started but login failed: {probe.stderr.strip()[-300:]}")
    try:
        yield info
    finally:
        subprocess.run([*shlex.split(ssh_command), "-O", "exit", "127.0.0.1"], capture_output=True, timeout=10)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
