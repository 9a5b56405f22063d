"""Start-up and exit (issue 20, items 14 and 15): options that cannot work stop the server at start with one line;
a model whose chat template is broken does not start; a second SIGTERM exits at once, non-zero, without tracebacks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import httpx

from tests.server.conftest import API_KEY, ServerProcess


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltaserve.server", *args, "--device", "cpu", "--port", "0"],
                          capture_output=True, text=True, timeout=timeout)


def test_an_api_key_no_client_can_send_is_refused_at_start(chat_ckpt):
    """HTTP headers carry ASCII only (test_endpoints checks the other unsendable keys without a process)."""
    done = _serve(str(chat_ckpt), "--api-key", "clé-secrète", timeout=60)
    assert done.returncode == 2 and "--api-key" in done.stderr and "Traceback" not in done.stderr
    assert "loading" not in done.stderr


def test_a_broken_chat_template_stops_the_server_at_start(chat_ckpt, tmp_path):
    model = tmp_path / "broken"
    shutil.copytree(chat_ckpt, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")  # unclosed tag
    done = _serve(str(model))
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "chat template" in out and "Traceback" not in out, out[-3000:]
    assert "listening" not in out


def test_second_sigterm_exits_at_once_non_zero_without_tracebacks(chat_ckpt, tmp_path):
    srv = ServerProcess(chat_ckpt, tmp_path / "server.log", "--api-key", API_KEY, "--shutdown-timeout", "60",
                        "--max-model-len", "4096")
    try:
        body = {"prompt": "a long one", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # streaming
            srv.terminate()
            time.sleep(0.5)  # draining: the stream would be given 60 s
            t0 = time.monotonic()
            srv.terminate()
            code = srv.proc.wait(30)
        assert time.monotonic() - t0 < 15
    finally:
        srv.stop(kill=True)
    log = srv.log()
    assert code == 1 and "Traceback" not in log, log[-3000:]
    assert "second signal" in log


def test_a_model_directory_that_is_not_a_checkpoint_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    for model in (tmp_path, tmp_path / "missing"):
        done = _serve(str(model), timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert f"error: no config.json in {model}" in done.stderr


def test_a_busy_port_is_one_line_and_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "deltaserve.server", "--device", "cpu", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    # before: argparse's whole usage text came first
    assert done.stderr.strip().splitlines() == [f"python -m deltaserve.server: error: cannot listen on "
                                                f"127.0.0.1:{port}: Address already in use; choose another --port "
                                                "(or stop what is using it)"]
