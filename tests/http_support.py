"""A throwaway ComfyUI server for workflow tests, driven over HTTP on loopback.

``prepare_base`` lays out a ComfyUI base directory (``--base-directory``: models, custom_nodes,
input, output, temp, user) with this repository symlinked as ``custom_nodes/<PACK_NAME>``;
``ComfyServer.start`` runs ``main.py --cpu`` from the checkout on a free loopback port with that
base and an in-memory database, so nothing is written into the checkout (bytecode writing is off
for the same reason). Standard library only: no HTTP client dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-nti-p2p"  # the folder name users get from a git clone / the Registry
BASE_FOLDERS = ("models", "custom_nodes", "input", "output", "temp", "user")


def prepare_base(base: Path, pack: Path = REPO_ROOT, images: tuple[Path, ...] = ()) -> Path:
    """Create a ComfyUI base directory with ``pack`` linked in and ``images`` in ``input/``."""
    for name in BASE_FOLDERS:
        (base / name).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    for image in images:
        shutil.copyfile(image, base / "input" / image.name)
    return base


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerError(RuntimeError):
    """The server did not start, died, or did not answer in time (message ends with its log)."""


@dataclass
class Response:
    status: int
    body: Any  # parsed JSON, or bytes when the reply is not JSON


@dataclass
class ComfyServer:
    comfy_root: Path
    base: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    started_in: float = 0.0  # seconds from spawn to the first answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        comfy_root: Path,
        base: Path,
        *,
        python: str | None = None,
        extra_args: tuple[str, ...] = (),
        timeout: float = 240.0,
    ) -> ComfyServer:
        """Spawn ``main.py --cpu`` on loopback and wait until it answers (or raise ServerError)."""
        port = free_port()
        log_path = base / "comfyui.log"
        args = [
            python or os.environ.get("COMFYUI_PYTHON") or sys.executable,
            "main.py",
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(port),
            "--base-directory", str(base),
            "--database-url", "sqlite:///:memory:",  # the default file lives in the checkout
            "--disable-api-nodes",  # paid-API nodes: slow to import, never used here
            *extra_args,
        ]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        begin = time.perf_counter()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                args, cwd=comfy_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        server = cls(comfy_root, base, port, process, log_path)
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        server.started_in = time.perf_counter() - begin
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise ServerError(f"ComfyUI exited with {code}" + self.log_tail())
            try:
                if self.get("/system_stats", timeout=5).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s" + self.log_tail())

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server (its own session), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    # ----------------------------------------------------------------------------- HTTP

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0
    ) -> Response:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                status, raw, ctype = reply.status, reply.read(), reply.headers.get_content_type()
        except urllib.error.HTTPError as err:  # 4xx/5xx still carry a JSON body
            status, raw, ctype = err.code, err.read(), err.headers.get_content_type()
        return Response(status, json.loads(raw) if ctype == "application/json" else raw)

    def get(self, path: str, timeout: float = 30.0) -> Response:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 30.0) -> Response:
        return self.request("POST", path, body, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return "\n--- ComfyUI log (tail) ---\n" + "\n".join(text)

    # ----------------------------------------------------------------------------- prompts

    def queue(self, prompt: dict[str, Any]) -> Response:
        """POST /prompt; 200 carries ``prompt_id``, 400 carries ``error`` and ``node_errors``."""
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def wait_history(self, prompt_id: str, timeout: float) -> dict[str, Any]:
        """The /history entry of a finished prompt (success or error); ServerError on timeout."""
        deadline = time.monotonic() + timeout
        path = "/history/" + urllib.parse.quote(prompt_id)
        while time.monotonic() < deadline:
            entry = self.get(path).body.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise ServerError("ComfyUI died while running a prompt" + self.log_tail())
            time.sleep(0.5)
        self.post("/interrupt", {})
        raise ServerError(f"prompt {prompt_id} not finished within {timeout:.0f} s"
                          + self.log_tail())

    def run(self, prompt: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Queue ``prompt`` and return its history entry; ServerError if rejected or failed."""
        reply = self.queue(prompt)
        if reply.status != 200:
            raise ServerError(f"/prompt refused the prompt: {json.dumps(reply.body, indent=1)}")
        entry = self.wait_history(reply.body["prompt_id"], timeout)
        if entry["status"]["status_str"] != "success":
            raise ServerError("prompt failed: " + execution_error(entry) + self.log_tail())
        return entry

    def image_file(self, image: dict[str, str]) -> Path:
        """Where an ``{"filename", "subfolder", "type"}`` image record (output/temp) lives."""
        if image.get("type") not in ("output", "temp"):
            raise ValueError(f"not a saved image record: {image}")
        return self.base / image["type"] / image.get("subfolder", "") / image["filename"]


def execution_error(entry: dict[str, Any]) -> str:
    """The exception message(s) recorded in a /history entry, or '' when none."""
    out = []
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            out.append(f"{data.get('node_type')} #{data.get('node_id')}: "
                       f"{data.get('exception_type')}: {data.get('exception_message')}")
    return "\n".join(out)


def node_error_text(body: dict[str, Any]) -> str:
    """All messages of a refused /prompt reply, flattened for asserts and humans."""
    parts = [str(body.get("error", {}).get("message", ""))]
    for node_id, err in (body.get("node_errors") or {}).items():
        for e in err.get("errors", []):
            parts.append(f"#{node_id} {err.get('class_type')}: {e.get('message')}: "
                         f"{e.get('details')}")
    return "\n".join(parts)
