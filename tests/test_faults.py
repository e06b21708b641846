"""Faults around a run rather than inside its input: the hub refusing an upload, two runs writing the
same output folder at once, an output folder that is the input folder. (The one-line cases of the
bad-input matrix are in test_bad_inputs.py.)"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import HERE, TEXT, cli_process
from sparsellm.cli import cli

TOKEN = "hf_sparsellmTEST0123456789abcdefSECRET"  # a fake token that must never appear in any output
MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.5"]


@pytest.fixture(scope="module")
def pruned(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "out"
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), *MAGNITUDE, "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _hub(monkeypatch, respond):
    """Every HTTP request of huggingface_hub goes to `respond(request)` (httpx MockTransport): the real
    client code turns the responses into its errors, as it would with the real hub."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    httpx = getattr(_http, "httpx2", None) or getattr(_http, "httpx", None)  # huggingface_hub 1.x: httpx; 2.x: httpx2
    if httpx is None or not hasattr(huggingface_hub, "set_client_factory"):
        pytest.skip("huggingface_hub before 1.0 talks to the hub through requests, not an httpx client")
    requests = []

    def handler(request):
        requests.append(request)
        return respond(request)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    huggingface_hub.close_session()
    return httpx, requests


@pytest.fixture
def restore_hub_client():
    import huggingface_hub
    from huggingface_hub.utils import _http

    yield
    huggingface_hub.set_client_factory(_http.default_client_factory)
    huggingface_hub.close_session()


def _created(httpx):
    return httpx.Response(200, json={"url": "https://huggingface.co/me/tiny", "name": "me/tiny"})


@pytest.mark.parametrize("case", ["401", "404", "403", "500", "echoed-token"])
def test_push_failures_exit_10_without_the_token(case, pruned, monkeypatch, caplog, restore_hub_client):
    """The hub refuses: one line naming the refusal and the fix, exit 10, and the token nowhere in the
    output or the log, even when the server echoes the Authorization header back."""
    def respond(request):
        auth = request.headers.get("authorization", "")
        if request.url.path == "/api/repos/create":
            if case in ("401", "echoed-token"):
                return httpx.Response(401, json={"error": f"Invalid credentials in Authorization header {auth}"})
            if case == "403":
                return httpx.Response(403, json={"error": "You don't have the rights to create a model under this namespace"})
            return _created(httpx)
        if request.url.path == "/api/validate-yaml":  # the model card's metadata, checked before the upload
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if request.url.path.startswith("/api/models/me/tiny/preupload"):
            if case == "404":
                return httpx.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"})
            return httpx.Response(500, json={"error": f"Internal Error {auth}"})
        return httpx.Response(418, json={"error": f"not mocked: {request.method} {request.url.path}"})

    httpx, requests = _hub(monkeypatch, respond)
    caplog.set_level(logging.DEBUG)
    r = CliRunner().invoke(cli, ["--debug", "push", str(pruned), "--repo-id", "me/tiny"], prog_name="sparsellm")
    expected = {
        "401": "the hub refused the token (401 Unauthorized); log in again with `hf auth login` or set HF_TOKEN to a valid token",
        "echoed-token": "the hub refused the token (401 Unauthorized); log in again with `hf auth login` or set HF_TOKEN to a "
                        "valid token",
        "403": "the token may not write there (403 Forbidden); use a token with write access to that namespace",
        "404": "the repository was not found (404); check the repo id, and that your token can see it",
        "500": None,
    }[case]
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 10, r.output
    if expected:
        assert errors == [f"error: upload to me/tiny failed: {expected}"]
    else:  # any other status: its text, with the token cut out
        assert len(errors) == 1 and errors[0].startswith("error: upload to me/tiny failed: HTTP 500: ") and "<token>" in errors[0]
    assert any(req.headers.get("authorization") == f"Bearer {TOKEN}" for req in requests)  # it was sent, to the hub only
    paths = [req.url.path for req in requests if req.method == "POST"]
    assert paths[-1] == ("/api/repos/create" if case in ("401", "echoed-token", "403") else "/api/models/me/tiny/preupload/main")
    assert TOKEN not in r.output and TOKEN not in caplog.text


def test_push_invalid_repo_id_exit_10(pruned, monkeypatch, restore_hub_client):
    httpx, requests = _hub(monkeypatch, lambda request: httpx.Response(500))
    for repo_id in ("me/tiny/extra", "me/ti ny", "-me/x", "me/" + "x" * 200):
        r = CliRunner().invoke(cli, ["push", str(pruned), "--repo-id", repo_id], prog_name="sparsellm")
        assert r.exit_code == 10 and r.output.strip().splitlines() == [
            f"error: invalid repo id {repo_id!r}; use NAME or OWNER/NAME (letters, digits, - _ .)"], r.output
    assert not [q for q in requests if q.method == "POST"]  # refused before anything was sent


def test_push_network_unreachable_exit_10(pruned, monkeypatch, restore_hub_client):
    def respond(request):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    httpx, _ = _hub(monkeypatch, respond)
    r = CliRunner().invoke(cli, ["push", str(pruned), "--repo-id", "me/tiny"], prog_name="sparsellm")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 10 and len(lines) == 1 and lines[0].startswith("error: upload to me/tiny failed: "), r.output
    assert lines[0].endswith("; check the repo id, your token's write permission and the network") and TOKEN not in r.output


# -- two runs, one output folder --------------------------------------------------------------------------

def _wait_stopped(proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until `proc` stopped itself (SIGSTOP at its fault point) or ended."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            return
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.2)
    raise AssertionError("the first run never reached its export point")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_two_runs_writing_one_output_folder(model_dirs, tmp_path):
    """Run A writes everything into its temp folder and is stopped (SIGSTOP) just before the rename;
    run B, the same command, completes the output folder; A continues: it must not replace B's folder
    (no --overwrite was given) nor mix into it, but end with one clear error and leave nothing behind."""
    out = tmp_path / "out"
    args = ["prune", "--model", model_dirs["llama"], *MAGNITUDE, "-o", out]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSELLM_TEST_")}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               SPARSELLM_TEST_KILL_AT="export", SPARSELLM_TEST_SIGNAL="STOP")
    a = subprocess.Popen([sys.executable, "-m", "sparsellm", *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(a)
        assert a.poll() is None, a.communicate()
        assert [p.name for p in tmp_path.iterdir()] == [f".out.partial-{a.pid}"]  # A's files, all in its temp folder
        b = cli_process(*args)
        assert b.returncode == 0, b.stderr
        b_files = {p.name: p.read_bytes() for p in out.iterdir()}
    finally:
        a.send_signal(signal.SIGCONT)
        stdout, stderr = a.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert a.returncode == 6 and errors == [
        f"error: output folder {out} was created by another run while this one was writing; this run's result was "
        "discarded: choose another --output, or pass --overwrite to replace it"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder of A left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == b_files  # B's folder, untouched and complete
    assert json.loads((out / "report.json").read_text())["sparsity"]["overall"] == pytest.approx(0.5)


# -- output folder = input folder -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["--in-memory", "--low-memory"])
def test_output_folder_equal_to_the_input_folder(mode, model_dirs, tmp_path):
    """Without --overwrite the input is an existing folder: refused (exit 6), untouched. With --overwrite
    the run reads the whole input before it replaces the folder, in both memory modes: the result is the
    one a run into another folder writes, and nothing else is left."""
    import shutil

    src = Path(shutil.copytree(model_dirs["llama"], tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    args = ["prune", "--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--calib", str(TEXT),
            "--nsamples", "2", "--seqlen", "16", mode]
    r = CliRunner().invoke(cli, [*args, "-o", str(src)])
    assert r.exit_code == 6 and f"output folder {src} already exists; pass --overwrite" in r.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    ref = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    r = CliRunner().invoke(cli, [*args, "-o", str(src), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ref"]
    for f in (tmp_path / "ref").glob("*.safetensors"):
        assert (src / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
