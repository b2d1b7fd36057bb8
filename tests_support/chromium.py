"""Debian's headless Chromium driven over the DevTools protocol, with the standard
library only: ``--remote-debugging-pipe`` (the browser reads commands on its fd 3 and
writes answers and events on its fd 4, each a JSON text ended by a NUL byte).

    with Chromium() as browser:
        page = browser.open('http://127.0.0.1:9000/')
        page.evaluate('document.title')
        page.requests        # every URL the page asked for (the Network domain's events)
        page.screenshot()    # PNG bytes
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar('T')

FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-default-apps', '--hide-scrollbars', '--mute-audio')


def chromium_path() -> str | None:
    return shutil.which('chromium') or shutil.which('chromium-browser')


def _above_4(fd: int) -> int:
    """``fd`` moved above 4 (closed), so that bash's ``3<&N 4>&M`` never clobbers
    one of the two ends it gives the browser."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium of its own (a fresh profile in a temporary directory)."""

    def __init__(self, timeout: float = 20) -> None:
        path = chromium_path()
        if path is None:
            raise RuntimeError('chromium is not installed: apt-get install -y chromium')
        self.path, self.timeout = path, timeout
        self._profile = tempfile.TemporaryDirectory(prefix='chromium-',
                                                    ignore_cleanup_errors=True)
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._next_id = 0
        self._closed = False

    def __enter__(self) -> Chromium:
        to_browser_r, self._to_browser = map(_above_4, os.pipe())
        self._from_browser, from_browser_w = map(_above_4, os.pipe())

        # the browser reads commands on its fd 3 and writes answers on its fd 4
        self.process = subprocess.Popen(
            ['bash', '-c', f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}',
             self.path, *FLAGS, f'--user-data-dir={self._profile.name}',
             '--remote-debugging-pipe', 'about:blank'],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._reader = threading.Thread(target=self._read, name='devtools', daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.call('Browser.close', timeout=5)
        except (DevToolsError, OSError, AssertionError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_browser)
        self._reader.join(5)
        self._profile.cleanup()

    # -- the protocol -------------------------------------------------------------------

    def _read(self) -> None:
        buffer = b''
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b''
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b'\0')
            with self._changed:
                for text in messages:
                    message = json.loads(text)
                    if 'id' in message:
                        self._answers[message['id']] = message
                    else:
                        self._events.append(message)
                self._changed.notify_all()
        os.close(self._from_browser)
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a command and wait for its answer (bounded); its ``result``."""
        with self._changed:
            self._next_id += 1
            number = self._next_id
        command: dict[str, Any] = {'id': number, 'method': method, 'params': params or {}}
        if session is not None:
            command['sessionId'] = session
        os.write(self._to_browser, json.dumps(command).encode() + b'\0')
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._changed:
            while number not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or (self._closed and method != 'Browser.close'):
                    raise DevToolsError(f'no answer to {method} within {timeout or self.timeout}s')
                self._changed.wait(min(left, 0.5))
            answer = self._answers.pop(number)
        if 'error' in answer:
            raise DevToolsError(f'{method}: {answer["error"]}')
        result: dict[str, Any] = answer.get('result', {})
        return result

    def events(self, method: str, session: str | None = None) -> list[dict[str, Any]]:
        """The params of the events called ``method`` received so far."""
        with self._changed:
            return [e.get('params', {}) for e in self._events if e['method'] == method
                    and (session is None or e.get('sessionId') == session)]

    def open(self, url: str, width: int = 1400, height: int = 900) -> Page:
        """A new tab, its Network domain on, navigated to ``url`` (and loaded)."""
        target = self.call('Target.createTarget', {'url': 'about:blank'})['targetId']
        session = self.call('Target.attachToTarget', {'targetId': target, 'flatten': True}
                            )['sessionId']
        page = Page(self, session)
        page.call('Network.enable')
        page.call('Page.enable')
        page.call('Emulation.setDeviceMetricsOverride',
                  {'width': width, 'height': height, 'deviceScaleFactor': 1, 'mobile': False})
        page.call('Page.navigate', {'url': url})
        page.wait_for(lambda: page.evaluate('document.readyState') == 'complete',
                      'the page to load')
        return page


class Page:
    """A tab of :class:`Chromium`, reached through its DevTools session."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        result = self.call('Runtime.evaluate', {'expression': expression,
                                                'returnByValue': True})
        if 'exceptionDetails' in result:
            raise DevToolsError(f'{expression}: {result["exceptionDetails"]}')
        return result['result'].get('value')

    def attributes(self, selector: str) -> list[dict[str, str]]:
        """The attributes of each element matching the CSS ``selector``."""
        return list(self.evaluate(
            f'Array.from(document.querySelectorAll({json.dumps(selector)})).map(e => '
            'Object.fromEntries(Array.from(e.attributes).map(a => [a.name, a.value])))'))

    @property
    def requests(self) -> list[str]:
        """The URL of every request the page made so far."""
        return [e['request']['url'] for e in self.browser.events('Network.requestWillBeSent',
                                                                 self.session)]

    def wait_for(self, check: Callable[[], T], what: str, timeout: float = 20) -> T:
        """Call ``check`` until it returns something true (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f'no {what} within {timeout}s')
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        """A PNG of the whole page (beyond the viewport)."""
        data = self.call('Page.captureScreenshot', {'format': 'png',
                                                    'captureBeyondViewport': True})['data']
        return base64.b64decode(data)
