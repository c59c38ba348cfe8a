"""matrix-js-sdk, the SDK behind Element Web, driven from the tests through a node process.

tests/e2e/js holds the driver (`driver.mjs`) and its pinned dependencies: matrix-js-sdk
and a node 22 binary, both from the npm registry (the SDK needs node >= 22; Debian 12
ships 18).  `make install-js`, which `make test` runs, installs them with `npm ci`.

The driver reads one JSON command a line and answers one JSON line each, so a test can
read mails and SMS between two SDK calls.  Every answer is awaited with a deadline.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import signal
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"
ANSWER_TIMEOUT_S = 45.0
NODE_ARCHES = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}


def node_binary() -> Path:
    """The node 22 that `npm ci` put in tests/e2e/js (skip, or fail under CI, if absent)."""
    arch = NODE_ARCHES.get(platform.machine().lower(), platform.machine())
    node = JS_DIR / "node_modules" / f"node-linux-{arch}" / "bin" / "node"
    sdk = JS_DIR / "node_modules" / "matrix-js-sdk" / "package.json"
    if not (node.exists() and sdk.exists()):
        missing = f"no matrix-js-sdk and node 22 in {JS_DIR / 'node_modules'}"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: `make test` installs them")
        pytest.skip(f"{missing} (make install-js)")
    return node


class SdkError(Exception):
    """What an SDK call threw: for a Matrix error, its HTTP status and errcode."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        self.name = str(error.get("name"))
        self.http_status: int | None = error.get("httpStatus")
        self.errcode: str | None = error.get("errcode")
        self.data: Any = error.get("data")
        super().__init__(f"{method}: {self.name}: {error.get('message')}")


@dataclass(frozen=True)
class SentRequest:
    """One HTTP request as the SDK put it on the wire."""

    method: str
    url: str
    body: Any  # the decoded JSON body, or None

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.url).path


class ElementSdk:
    """One node process running the driver; its MatrixClients are named by the test."""

    def __init__(self, log_file: Path, ca_file: Path) -> None:
        self.log_file = log_file
        self.ca_file = ca_file
        self.proc: subprocess.Popen[str] | None = None
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0

    def start(self) -> None:
        node = node_binary()
        # The SDK's fetch trusts the throwaway test CA that kith's certificate comes from.
        env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(self.ca_file)}
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [str(node), str(JS_DIR / "driver.mjs")], cwd=JS_DIR, env=env, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        threading.Thread(target=self._read_answers, args=(self.proc,), daemon=True).start()

    def _read_answers(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                continue  # not an answer; the driver logs to stderr
            if isinstance(answer, dict):
                self._answers.put(answer)
        self._answers.put(None)  # the driver has exited

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the driver exits at the end of its input
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:]

    def _send(self, command: dict[str, Any]) -> Any:
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError("the SDK driver is not running")
        self._next_id += 1
        wanted = self._next_id
        self.proc.stdin.write(json.dumps({**command, "id": wanted}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                answer = self._answers.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise TimeoutError(f"no answer to {command} in {ANSWER_TIMEOUT_S} s; driver "
                                   f"log:\n{self.log_tail()}") from None
            if answer is None:
                self._answers.put(None)  # for whoever asks next
                raise RuntimeError(f"the SDK driver exited; its log:\n{self.log_tail()}")
            if answer.get("id") != wanted:
                continue  # the late answer to a command that timed out
            if not answer.get("ok"):
                raise SdkError(str(command.get("method", command["op"])), answer["error"])
            return answer.get("result")

    def client(self, name: str, *, homeserver_url: str, identity_server_url: str,
               user_id: str, access_token: str) -> None:
        """A MatrixClient made as Element makes one for a signed-in user."""
        self._send({"op": "client", "name": name, "baseUrl": homeserver_url,
                    "idBaseUrl": identity_server_url, "userId": user_id,
                    "accessToken": access_token})

    def call(self, name: str, method: str, *args: Any) -> Any:
        """`client.<method>(...args)` on the client `name`; raises SdkError if it throws."""
        return self._send({"op": "call", "name": name, "method": method, "args": list(args)})

    def set_identity_token(self, name: str, token: str) -> None:
        """What the client's identity server provider (`getAccessToken`) answers."""
        self._send({"op": "setIdentityToken", "name": name, "token": token})

    def take_requests(self) -> list[SentRequest]:
        """The requests every client sent since the last call."""
        return [SentRequest(r["method"], r["url"], json.loads(r["body"]) if r["body"] else None)
                for r in self._send({"op": "takeRequests"})]
