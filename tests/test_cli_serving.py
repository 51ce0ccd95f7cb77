"""`dashskip serve`, `dashskip chat` and streaming `dashskip generate` as real processes on a tiny model folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import openai
import pytest
import torch
from typer.testing import CliRunner

from dashskip.api import DashModel
from dashskip.cli import _read_turn, app
from dashskip.models.chat import chat_input_ids
from dashskip.serve.scheduler import off_the_main_thread
from dashskip.serve.server import listen
from tests.conftest import tiny_smol

COMMAND = [sys.executable, "-c", "from dashskip.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "200"}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a Hugging Face folder the CLI can load."""
    path = tmp_path_factory.mktemp("models") / "tiny-smol"
    tiny_smol(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reply(tokenizer):
    """What the saved model answers, computed directly with the same weights."""
    model = DashModel(tiny_smol(tokenizer), tokenizer)

    def answer(ids: list[int], max_new_tokens: int) -> str:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    return answer


@pytest.mark.parametrize("command", ["serve", "chat", "generate"])
def test_help_shows_an_example(command):
    out = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert out.exit_code == 0 and f"Example: dashskip {command} " in out.stdout


def test_generate_streams_the_continuation(folder, tokenizer, reply):
    out = run("generate", "Once upon a time", "--model", folder, "--max-new-tokens", "10")
    assert out.returncode == 0, out.stderr
    expected = reply(tokenizer("Once upon a time")["input_ids"], 10)
    assert expected.strip() and out.stdout.startswith("Once upon a time") and expected in out.stdout
    assert "10 tokens" in out.stderr


def test_chat_keeps_the_conversation_and_stops_at_exit(folder, tokenizer, reply):
    out = run("chat", "--model", folder, "--max-new-tokens", "8", stdin="Hello\nWhat next?\n/exit\nnever sent\n")
    assert out.returncode == 0, out.stderr
    first = [{"role": "user", "content": "Hello"}]
    one = reply(chat_input_ids(tokenizer, first), 8)
    second = [*first, {"role": "assistant", "content": one}, {"role": "user", "content": "What next?"}]
    two = reply(chat_input_ids(tokenizer, second), 8)  # the second turn sees the first
    assert one.strip() and two.strip() and one in out.stdout and two in out.stdout
    assert out.stdout.count("you> ") == 3 and out.stderr.count("8 tokens") == 2


def test_end_of_input_ends_the_chat(monkeypatch):
    def eof(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert _read_turn() is None


def test_serve_answers_openai_clients_and_stops_on_ctrl_c(folder):
    args = [*COMMAND, "serve", "--model", folder, "--port", "0", "--max-tokens", "8"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        while "serving '" not in (line := proc.stderr.readline()):
            assert line, "the server exited before serving"
        assert line.startswith("serving 'tiny-smol' at http://127.0.0.1:")  # the folder's name, never its path
        client = openai.OpenAI(base_url=line.split(" at ")[1].split()[0], api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-smol"]
        assert client.completions.create(model="tiny-smol", prompt="Hi", max_tokens=8).usage.completion_tokens <= 8
        with pytest.raises(openai.BadRequestError, match="limit of 8"):
            client.completions.create(model="tiny-smol", prompt="Hi", max_tokens=9)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=folder, prompt="Hi", max_tokens=2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_busy_port_is_a_one_line_error(folder):
    with listen("127.0.0.1", 0) as busy:
        port = busy.getsockname()[1]
        out = run("serve", "--model", folder, "--port", str(port))
    assert out.returncode == 2 and f"error: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_public_address_warning_comes_before_binding(folder):
    """The note about --host 0.0.0.0 is printed before the socket is bound (and so before the model loads)."""
    with listen("0.0.0.0", 0) as busy:
        port = busy.getsockname()[1]
        out = run("serve", "--model", folder, "--host", "0.0.0.0", "--port", str(port))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "exposes the server beyond this machine" in lines[0]
    assert "--api-key" in lines[0] and lines[-1].startswith("error: cannot listen on 0.0.0.0")


def test_a_model_that_fails_to_load_for_serving_is_a_one_line_error(folder, tmp_path):
    """The model loads on a thread of its own (`off_the_main_thread`); what fails there reaches the user as the
    command's one-line error."""
    broken = tmp_path / "policy.safetensors"
    broken.write_bytes(b"not a policy")
    out = run("serve", "--model", folder, "--port", "0", "--policy", str(broken))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in out.stderr


def test_off_the_main_thread_returns_what_the_call_returns_or_raises():
    import threading

    assert off_the_main_thread(lambda: threading.current_thread() is not threading.main_thread())
    with pytest.raises(ValueError, match="bad"):
        off_the_main_thread(lambda: int("bad"))
