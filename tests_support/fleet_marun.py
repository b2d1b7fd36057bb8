"""``marun --http`` in a process of its own, for the fleet tests: its HTTP endpoints,
bounded waits, and a stop that leaves nothing running (the process and its agent
processes are stopped by their own pids, never by name)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar('T')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


class Marun:
    """``marun MODULE... [ARGS] --http 127.0.0.1:PORT`` (from the project root, or
    ``cwd``, with the project on PYTHONPATH)."""

    def __init__(self, modules: list[str], env: dict[str, str] | None = None,
                 args: list[str] | None = None, http: bool = True,
                 cwd: Path = ROOT) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.args = [*modules, *(args or []),
                     *(['--http', f'127.0.0.1:{self.port}'] if http else [])]
        self.env = {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONUNBUFFERED': '1',
                    **(env or {})}
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by __exit__
            prefix='marun-', suffix='.log', delete=False)
        self.process: subprocess.Popen[bytes] | None = None
        self.agent_pids: set[int] = set()
        self._output: str | None = None

    def __enter__(self) -> Marun:
        self.process = subprocess.Popen(
            [sys.executable, '-c', 'import microagent; microagent.run()', *self.args],
            cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        self._output = self.output
        self._log.close()
        os.unlink(self._log.name)

    @property
    def output(self) -> str:
        """What marun and its agents wrote so far (standard output and error)."""
        if self._output is not None:
            return self._output
        return Path(self._log.name).read_text(errors='replace')

    # -- HTTP -------------------------------------------------------------------------

    def get(self, path: str) -> tuple[int, bytes]:
        """Status and body of ``GET path``; status 0 while nothing answers."""
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{self.port}{path}',
                                        timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b''

    def status(self) -> dict[str, Any]:
        code, body = self.get('/status')
        assert code == 200, (code, body)
        status: dict[str, Any] = json.loads(body)
        self.agent_pids.update(a['pid'] for a in status['agents'] if a['pid'])
        return status

    def readyz(self) -> tuple[int, dict[str, Any]]:
        code, body = self.get('/readyz')
        return code, json.loads(body) if body else {}

    def metrics(self) -> dict[str, Any]:
        """The metric families of ``/metrics``, by name, parsed by prometheus_client."""
        code, body = self.get('/metrics')
        assert code == 200, (code, body)
        return {family.name: family for family in text_string_to_metric_families(body.decode())}

    def total(self, sample_name: str, /, **labels: str) -> float:
        """The sum of the samples called ``sample_name`` (or ``sample_name_total``, a
        counter's) whose labels include ``labels``."""
        names = (sample_name, f'{sample_name}_total')
        return sum(sample.value for family in self.metrics().values()
                   for sample in family.samples
                   if sample.name in names
                   and all(sample.labels.get(k) == v for k, v in labels.items()))

    # -- waiting ------------------------------------------------------------------------

    def wait_for(self, check: Callable[[], T], timeout: float, what: str) -> T:
        """Call ``check`` until it returns something true (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f'marun ended ({self.process.returncode}) waiting for '
                                     f'{what}:\n{self.output}')
            if time.monotonic() > deadline:
                raise AssertionError(f'no {what} within {timeout}s:\n{self.output}')
            time.sleep(0.1)

    async def wait_async(self, check: Callable[[], T], timeout: float, what: str) -> T:
        """:meth:`wait_for` without blocking the test's event loop."""
        return await asyncio.to_thread(self.wait_for, check, timeout, what)

    def ready(self, timeout: float = 30) -> dict[str, Any]:
        self.wait_for(lambda: self.readyz()[0] == 200 if self.get('/livez')[0] else False,
                      timeout, 'readiness')
        return self.status()

    # -- stopping -----------------------------------------------------------------------

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM marun and wait for its exit status (bounded)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'marun did not exit within {timeout}s:\n{self.output}'
                                 ) from None

    def kill(self) -> None:
        """Kill marun if it still runs. Its agent processes stop by themselves within a
        second or two once their supervisor is gone; one of those it reported that is
        still there after 10 s (checked to be a multiprocessing child) is killed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        deadline = time.monotonic() + 10
        for pid in self.agent_pids:
            while _agent_process(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _agent_process(pid):
                os.kill(pid, signal.SIGKILL)


def _agent_process(pid: int) -> bool:
    """True while ``pid`` is a live process started by multiprocessing (an agent)."""
    try:
        cmdline = Path(f'/proc/{pid}/cmdline').read_bytes()
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    return b'multiprocessing' in cmdline and state != 'Z'
