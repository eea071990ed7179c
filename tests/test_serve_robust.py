"""`psoft-deploy serve` against what one user or one restart must not break (issue 24): a prompt
beyond the model's vocabulary, stops that leave /dev/shm as it was, a port already taken and a
base without a tokenizer. Real vLLM (CPU) servers over the demo's tiny Llama."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import complete, free_port, healthy, run, wait_for_serving

from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.testing import build_tiny_model, build_tokenizer, bundled_text

VLLM_ARGS = ["--enforce-eager", "--max-num-seqs", "8"]
SHM = "/dev/shm"


def start_serve(base, work, port):
    """``psoft-deploy serve`` of ``base`` alone (an empty adapter root) on ``port``; returns it once serving."""
    (work / "root").mkdir(exist_ok=True)
    stderr = work / f"serve-{port}.log"
    with open(stderr, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--adapter-root", str(work / "root"),
             "--port", str(port), "--cache-dir", str(work / "cache"), "--", *VLLM_ARGS],
            stdout=output, stderr=subprocess.STDOUT,
        )
    wait_for_serving(process, stderr)
    return process, stderr


def stop(process) -> float:
    """Ctrl-C serve; the seconds it took to exit 0."""
    start = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    return time.monotonic() - start


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.slow
def test_a_prompt_beyond_the_models_vocabulary_gets_400_and_the_engine_stays_up(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)  # 384 embeddings
    tokenizer = build_tokenizer(base, bundled_text(), vocab_size=420, chat=True)  # 420 tokens
    assert max(tokenizer("mountain")["input_ids"]) >= 384
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log = start_serve(base, tmp_path, port)
    try:
        assert "the tokenizer has 420 tokens, the model 384" in log.read_text()
        model = str(base)
        status, body = complete(url, model, "The mountain river")
        assert status == 400 and "beyond the model's vocabulary of 384 tokens" in body["error"]["message"], body
        status, body = post(f"{url}/v1/completions", {"model": model, "prompt": [[5, 6, 400]], "max_tokens": 2})
        assert status == 400, body
        chat = {"model": model, "messages": [{"role": "user", "content": "mountain"}], "max_tokens": 2}
        status, body = post(f"{url}/v1/chat/completions", chat)
        assert status == 400 and body["error"]["param"] == "messages", body
        status, body = complete(url, model, "The river carries water")
        assert status == 200 and len(body["choices"][0]["token_ids"]) > 0, body
        status, body = post(f"{url}/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "snow"}]})
        assert status == 200, body
        assert healthy(url)
    finally:
        stop(process)


@pytest.mark.slow
def test_three_stops_leave_dev_shm_as_it_was(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    before = sorted(os.listdir(SHM))
    port = free_port()
    for cycle in range(3):
        process, log = start_serve(base, tmp_path, port)
        assert complete(f"http://127.0.0.1:{port}", str(base), "The river")[0] == 200
        assert stop(process) < 30, f"cycle {cycle}"
        assert sorted(os.listdir(SHM)) == before, f"cycle {cycle}: {log.read_text()[-3000:]}"
    vllm_log = tmp_path / f"vllm-{port}.log"  # beside the cache directory, named in the serving line
    assert f"vLLM log: {vllm_log}" in log.read_text()
    assert "force killing" not in vllm_log.read_text()  # stopped by its own graceful shutdown


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_another_server_holds_is_refused_in_one_line_before_vllm_starts(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    other = http.server.HTTPServer(("127.0.0.1", 0), Health)
    port = other.server_address[1]
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        assert healthy(f"http://127.0.0.1:{port}")
        start = time.monotonic()
        result = run("serve", "--base", base, "--adapter-root", tmp_path, "--port", port, "--cache-dir",
                     tmp_path / "cache")
        assert time.monotonic() - start < 5
    finally:
        other.shutdown()
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another port with --port"]


def test_a_base_without_tokenizer_is_refused_in_one_line_before_vllm_starts(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", with_tokenizer=False, **MODEL_SIZES)
    result = run("serve", "--base", base, "--adapter-root", tmp_path, "--port", free_port(), "--cache-dir",
                 tmp_path / "cache")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot load the tokenizer of {base} (transformers: "), lines
    assert lines[0].endswith("serve needs the base's tokenizer files beside its weights, or one passed with "
                             "-- --tokenizer DIR")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("vllm-*.log")), "refused before vLLM started"
