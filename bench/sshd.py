"""A throwaway sshd on 127.0.0.1 for the benchmark, like the test fixture.

    python bench/sshd.py            # start one, print how to reach it, stop on Enter / Ctrl-C

It starts ``sshd -D`` on a free port with a temporary host key and a fresh
ed25519 client key in authorized_keys, in a temporary directory that is
removed on stop. Every SSH transfer of the benchmark (deltalog sync, rsync,
scp) goes through it, so all of them pay the same transport: encryption,
loopback TCP and the same ssh client.

Byte counts on the wire: the ssh client prints, at debug level 1,
``Transferred: sent N, received M bytes`` when the session ends. ``ssh_args``
adds ``-E LOG -o LogLevel=DEBUG1`` when asked for a log file (scp: ``-v``
and its stderr), and :func:`wire_bytes` reads the total back; that is the encrypted traffic
including the handshake, measured without putting anything in the data path.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def find_sshd() -> str | None:
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.path.exists(candidate):
            return os.path.abspath(candidate)  # sshd refuses to start from a relative path
    return None


def missing_tools() -> list[str]:
    """What is missing to run an sshd here ([] when everything is installed)."""
    missing = []
    if find_sshd() is None:
        missing.append("sshd (openssh-server)")
    for tool in ("ssh", "ssh-keygen", "scp"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (openssh-client)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """``with Sshd() as d:`` a running sshd on 127.0.0.1:d.port that accepts d.key."""

    host = "127.0.0.1"

    def __init__(self):
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.port = 0

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> "Sshd":
        missing = missing_tools()
        if missing:
            raise RuntimeError("missing " + ", ".join(missing) + " (run: sudo bash bench/setup.sh)")
        self.dir = tempfile.mkdtemp(prefix="deltalog-bench-sshd-")
        d = self.dir
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)], check=True)
        with open(os.path.join(d, "client_key.pub")) as src, open(os.path.join(d, "authorized_keys"), "w") as dst:
            dst.write(src.read())
        os.chmod(os.path.join(d, "authorized_keys"), 0o600)
        os.chmod(os.path.join(d, "client_key"), 0o600)
        self.port = _free_port()
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"Port {self.port}\n"
                "ListenAddress 127.0.0.1\n"
                f"HostKey {d}/host_key\n"
                f"AuthorizedKeysFile {d}/authorized_keys\n"
                f"PidFile {d}/sshd.pid\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "PermitRootLogin prohibit-password\n"
                f"AllowUsers {getpass.getuser()}\n"
                "MaxStartups 100\n"
                "MaxSessions 100\n"
                "LogLevel ERROR\n"
                "Subsystem sftp internal-sftp\n"
            )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        log = open(os.path.join(d, "sshd.log"), "wb")
        self.proc = subprocess.Popen([find_sshd(), "-D", "-e", "-f", config], stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd did not start: {self._log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("sshd did not start listening within 10 s")
                time.sleep(0.05)
        probe = subprocess.run([*self.ssh_args(), "-T", self.host, "true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            err = probe.stderr.strip()[-300:]
            self.stop()
            raise RuntimeError(f"sshd started but login failed: {err}")
        return self

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "sshd.log"), errors="replace") as f:
                return f.read()[-300:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "Sshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- how to reach it ----------------------------------------------------------

    @property
    def key(self) -> str:
        return os.path.join(self.dir, "client_key")

    def common_options(self) -> list[str]:
        """Options shared by ssh and scp (scp takes -P for the port, ssh -p)."""
        return ["-i", self.key, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"]

    def ssh_args(self, log: str | None = None) -> list[str]:
        """ssh with its debug log (and so the byte count) appended to ``log`` when given."""
        logging = ["-E", log, "-o", "LogLevel=DEBUG1"] if log else ["-o", "LogLevel=ERROR"]
        return ["ssh", "-p", str(self.port), *self.common_options(), *logging]

    def ssh_command(self, log: str | None = None) -> str:
        """For rsync -e and deltalog --ssh-command."""
        return shlex.join(self.ssh_args(log))

    def scp_args(self, verbose: bool = False) -> list[str]:
        """scp; with ``verbose`` its stderr carries the byte count (scp has no -E: capture stderr)."""
        return ["scp", "-v" if verbose else "-q", "-P", str(self.port), *self.common_options()]


_TRANSFERRED = re.compile(r"Transferred: sent (\d+), received (\d+) bytes")


def wire_bytes(log: str) -> int | None:
    """Bytes on the wire (sent + received, every session) from ssh -E LOG debug output; None if not found."""
    try:
        with open(log, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    found = _TRANSFERRED.findall(text)
    if not found:
        return None
    return sum(int(s) + int(r) for s, r in found)


def main() -> None:
    with Sshd() as d:
        print(f"sshd on {d.host}:{d.port}")
        print(f"  ssh:   {d.ssh_command()} {d.host}")
        print(f"  rsync: rsync -e {shlex.quote(d.ssh_command())} SRC {d.host}:DST")
        print(f"  sync:  deltalog sync SRC {d.host}:DST --ssh-command {shlex.quote(d.ssh_command())} "
              f"--remote-deltalog {shlex.quote(sys.executable + ' -m deltalog')}")
        try:
            input("Enter stops it. ")
        except (KeyboardInterrupt, EOFError):
            pass


if __name__ == "__main__":
    main()
