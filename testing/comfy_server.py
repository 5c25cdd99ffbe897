"""Start and drive a real ComfyUI server (main.py --cpu) with this pack, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import websocket  # websocket-client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_dir: str, base_dir: str, pack_dir: str, model_dirs: dict[str, str],
                 extra_packs: dict[str, str] | None = None, env: dict[str, str] | None = None):
        """env: extra environment variables for the server process (e.g. DOMAINSTUDIO_IMAGE_ROOTS),
        on top of this process's environment."""
        self.comfy_dir = comfy_dir
        self.env = dict(env or {})
        self.base = base_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        packs = os.path.join(base_dir, "packs")
        for d in (packs, os.path.join(base_dir, "custom_nodes")):  # main.py lists the latter at start-up
            os.makedirs(d, exist_ok=True)
        for name, path in {"ComfyUI-DomainStudio": pack_dir, **(extra_packs or {})}.items():
            link = os.path.join(packs, name)
            if not os.path.islink(link):
                os.symlink(path, link)
        lines = ["domainstudio_tests:", f"  base_path: {base_dir}", "  custom_nodes: packs"]
        lines += [f"  {kind}: {path}" for kind, path in model_dirs.items()]
        self.yaml = os.path.join(base_dir, "extra_model_paths.yaml")
        with open(self.yaml, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log_path = os.path.join(base_dir, "server.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base, "--extra-model-paths-config", self.yaml,
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "w")
        # Own process group, so stop() also ends anything the server spawned.
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **self.env})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        finally:
            self._log.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_raw(self, path: str) -> tuple[int, bytes]:
        """(HTTP status, body) of a GET, also for error statuses (e.g. 400/403/404 from /view)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, payload: dict | None = None):
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(body) if body else None

    def run(self, workflow: dict, timeout: float = 600.0, on_message=None) -> tuple[str, list[dict]]:
        """Queue an API-format workflow and follow /ws until it finishes. Returns (prompt_id, messages).
        on_message(msg) may act mid-run (e.g. POST /interrupt)."""
        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)
        messages: list[dict] = []
        try:
            prompt_id = self.post("/prompt", {"prompt": workflow, "client_id": client_id})["prompt_id"]
            deadline = time.time() + timeout
            while time.time() < deadline:
                raw = ws.recv()
                if isinstance(raw, bytes):
                    continue  # preview images
                msg = json.loads(raw)
                msg["t"] = time.time()
                messages.append(msg)
                if on_message:
                    on_message(msg)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return prompt_id, messages
                if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    return prompt_id, messages
            raise TimeoutError(f"workflow did not finish within {timeout} s")
        finally:
            ws.close()

    def outputs(self, prompt_id: str, timeout: float = 30.0) -> dict:
        # The websocket reports success a moment before the queue records the history entry.
        deadline = time.time() + timeout
        while True:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist or time.time() > deadline:
                return hist[prompt_id]["outputs"]
            time.sleep(0.1)

    def output_file(self, image: dict) -> str:
        return os.path.join(self.base, "output", image.get("subfolder", ""), image["filename"])
