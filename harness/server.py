"""Start the real ComfyUI server (``main.py --cpu``) with the pack installed, and talk to it."""
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .comfy_host import REPO, comfyui_dir

OPTIONAL_BUILTIN_FAILURES = {"IMPORT FAILED: nodes_audio.py", "IMPORT FAILED: nodes_audio_encoder.py"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server on a free loopback port, in its own temporary output/user/input folders.

    ``extra_custom_nodes`` adds folders of custom nodes for this server only (the test-only nodes
    under ``tests/`` use it); the pack itself is loaded from ComfyUI's ``custom_nodes/`` link.
    ``models_dir`` (``<workdir>/models``) is one more models folder of this server only: files written to its
    MODEL_FOLDERS at test time are listed by the stock loaders (the real-model workflow runs use it).
    """

    MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae")

    def __init__(self, extra_custom_nodes: list[Path] = (), start_timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="guidance-kit-server-"))
        self.log_path = self.workdir / "server.log"
        self.output_dir = self.workdir / "output"
        self.models_dir = self.workdir / "models"
        self.extra_custom_nodes = [Path(p) for p in extra_custom_nodes]
        self.start_timeout = start_timeout
        self.process = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        for folder in ("input", "user", "output"):
            (self.workdir / folder).mkdir(exist_ok=True)
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--output-directory", str(self.output_dir),
                   "--input-directory", str(self.workdir / "input"), "--user-directory", str(self.workdir / "user")]
        config = self.workdir / "extra_model_paths.yaml"
        lines = ["guidance_kit_tests:", f"  base_path: {self.models_dir}"]
        lines += [f"  {folder}: {folder}" for folder in self.MODEL_FOLDERS]
        if self.extra_custom_nodes:
            lines += ["  custom_nodes: |"] + [f"    {p}" for p in self.extra_custom_nodes]
        for folder in self.MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        config.write_text("\n".join(lines) + "\n")
        command += ["--extra-model-paths-config", str(config)]
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=comfyui_dir(), stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.start_timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process:
            self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def import_failures(self) -> list[str]:
        """Every "IMPORT FAILED" line of the log, but for built-in nodes whose optional dependency
        (torchaudio, left out on purpose: see README) is not installed."""
        return [line for line in self.log().splitlines()
                if "IMPORT FAILED" in line and line.strip() not in OPTIONAL_BUILTIN_FAILURES]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"POST {path} -> {error.code}: {error.read().decode(errors='replace')}") from error

    def queue(self, api_prompt: dict) -> str:
        return self.post("/prompt", {"prompt": api_prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Wait for a queued prompt; returns its /history entry (raises if it failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                if entry["status"].get("status_str") != "success":
                    raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(entry['status'])[:3000]}")
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, api_prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.queue(api_prompt), timeout)

    def comfy_cli_run(self, workflow: Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """Run a workflow file through comfy-cli against this server (stdin closed, as in CI)."""
        comfy = Path(sys.executable).parent / "comfy"
        return subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "run", "--workflow", str(workflow),
                               "--host", "127.0.0.1", "--port", str(self.port), "--wait",
                               "--timeout", str(int(timeout))],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout + 60,
                              cwd=REPO)
