"""`paligemma download` and `resolve_model` against a fake Hugging Face Hub on 127.0.0.1.

The fake Hub answers the requests huggingface_hub 2.4's `snapshot_download` and `hf_hub_download` make
(a Space's or dataset's files under `/spaces/...`, `/datasets/...`, keyed `spaces/owner/name`):

  GET  /api/models/{repo}/revision/{rev}     repo info; its `sha` pins the commit
  GET  /api/models/{repo}/tree/{commit}      the file listing (one page, no `Link` header)
  HEAD /{repo}/resolve/{commit}/{file}       X-Repo-Commit, ETag (X-Linked-Etag/-Size for LFS files)
  GET  /{repo}/resolve/{commit}/{file}       the bytes; `Range: bytes=N-` gets a 206

Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, GatedRepo) as the real Hub does, since
that header, not the status, is what huggingface_hub turns into its exception types.
Every test gets its own HF_HOME, so nothing reads or writes the real cache or token.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import typer
from huggingface_hub import constants
from typer.testing import CliRunner

from paligemma_cli import settings as model_source
from paligemma_cli.cli import friendly_errors
from paligemma_cli.commands.download import download
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.settings import default_model_source, resolve_model

TOKEN = "hf_good_token"

# 64 KiB of weights after a real safetensors header, so the file can break off halfway through.
_HEADER = json.dumps({"w": {"dtype": "F32", "shape": [16384], "data_offsets": [0, 65536]}}).encode()
SAFETENSORS = len(_HEADER).to_bytes(8, "little") + _HEADER + bytes(range(256)) * 256
FILES = {
    "config.json": json.dumps({"model_type": "paligemma"}).encode(),
    "model.safetensors": SAFETENSORS,
    "tokenizer.model": b"\x0a\x05hello sentencepiece" * 10,
    "flax_model.msgpack": b"not wanted" * 1000,
    "README.md": b"# tiny\n",
}
LFS = {"model.safetensors", "tokenizer.model", "flax_model.msgpack", "vae-oid.npz"}


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    drop_first_get: set[str] = field(default_factory=set)  # files whose first download breaks off halfway
    sha: str = ""

    def __post_init__(self):
        self.sha = hashlib.sha1(json.dumps(sorted(self.files)).encode() + bytes(self.gated)).hexdigest()


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        path = unquote(urlparse(self.path).path)
        self.server.log.append((self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if kind == "revision":
                info = {"id": repo_id, "sha": repo.sha, "gated": "manual" if repo.gated else False,
                        "siblings": [{"rfilename": f} for f in repo.files]}
                return self._json(info, body)
            if kind == "tree":
                return self._json([self._tree_entry(f, data) for f, data in repo.files.items()], body)
        kind = parts[0] + "/" if parts[0] in ("spaces", "datasets") else ""  # Space and dataset files
        if kind:
            parts = parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, filename = kind + "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                # The Hub answers 401 to anonymous users and 403 to a token without access.
                status = 403 if self.headers.get("Authorization") else 401
                return self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
            if filename not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", commit=repo.sha)
            return self._file(repo, filename, body)
        self._error(404, None, "not found")

    def _repo(self, repo_id: str, rev: str) -> Repo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif rev not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if name in LFS:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, repo: Repo, filename: str, body: bool):
        data = repo.files[filename]
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if rng else 200)
        self.send_header("X-Repo-Commit", repo.sha)
        if filename in LFS:
            etag = hashlib.sha256(data).hexdigest()
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        else:
            etag = hashlib.sha1(data).hexdigest()
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        if filename in repo.drop_first_get and not rng:
            repo.drop_first_get.discard(filename)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the network fails mid-file
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def _json(self, obj, body: bool):
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None):
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """A private HF_HOME; huggingface_hub froze these paths at import, so patch the constants too."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PALIGEMMA_MODEL", "PALIGEMMA_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.config/paligemma/config.toml of the real user
    return home


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    server.repos["google/paligemma-tiny"] = Repo(dict(FILES))
    server.repos["google/paligemma-gated"] = Repo(dict(FILES), gated=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def offline(monkeypatch):
    """Point HF_ENDPOINT at a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


def run(*args: str):
    app = typer.Typer()
    app.command("download")(friendly_errors(download))

    @app.command("other")  # a second command keeps `download` a subcommand, as in the real app
    def other():
        pass

    return CliRunner().invoke(app, ["download", *args])


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}


def test_download_fetches_only_the_needed_files(hub):
    result = run("google/paligemma-tiny")

    assert result.exit_code == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert result.stdout == f"{folder}\n"  # nothing but the path on stdout
    assert "downloading google/paligemma-tiny" in result.stderr
    assert folder.is_relative_to(constants.HF_HUB_CACHE)
    assert files_in(folder) == {"config.json", "model.safetensors", "tokenizer.model"}
    assert (folder / "model.safetensors").read_bytes() == SAFETENSORS
    assert not [p for _, p, _ in hub.log if p.endswith(("flax_model.msgpack", "README.md"))]


def test_resolve_model_finds_the_download_offline(hub, monkeypatch):
    folder = Path(run("google/paligemma-tiny").stdout.strip())
    hub.log.clear()

    assert resolve_model("google/paligemma-tiny") == folder
    assert hub.log == []  # resolving never asks the Hub

    with pytest.raises(PaliGemmaError, match=r"model 'google/paligemma2-3b-mix-224' is not downloaded; "
                                             r"run `paligemma download google/paligemma2-3b-mix-224` first"):
        resolve_model("google/paligemma2-3b-mix-224")

    monkeypatch.setenv("PALIGEMMA_MODEL", "google/paligemma-tiny")
    assert resolve_model(None) == folder
    assert default_model_source() == "env:PALIGEMMA_MODEL"


def test_download_to_local_dir(hub, tmp_path):
    target = tmp_path / "ckpt"
    result = run("google/paligemma-tiny", "--local-dir", str(target))

    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()) == target.resolve()
    assert files_in(target) == {"config.json", "model.safetensors", "tokenizer.model"}
    assert resolve_model(str(target)) == target.resolve()


@pytest.mark.parametrize("token", [None, "hf_wrong"], ids=["anonymous-401", "no-access-403"])
def test_gated_repo(hub, token):
    args = ["google/paligemma-gated"] + (["--token", token] if token else [])
    result = run(*args)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "error: access to google/paligemma-gated is gated: accept the licence at "
        "https://huggingface.co/google/paligemma-gated and set HF_TOKEN or pass --token"
    )


def test_gated_repo_with_token_from_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = run("google/paligemma-gated")

    assert result.exit_code == 0, result.stderr
    assert (Path(result.stdout.strip()) / "config.json").is_file()


def test_unknown_repo(hub):
    result = run("google/paligemma-nope")

    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: no such model repository 'google/paligemma-nope'")


def test_unknown_revision(hub):
    result = run("google/paligemma-tiny", "--revision", "v9")

    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: model repository 'google/paligemma-tiny' has no revision 'v9'"


def test_no_network_with_nothing_cached(offline):
    result = run("google/paligemma-tiny")

    assert result.exit_code == 1
    line = result.stderr.splitlines()[-1]
    assert line.startswith("error: cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert line.endswith("; nothing is cached")


def test_no_network_lists_what_is_cached(hub, monkeypatch):
    assert run("google/paligemma-tiny").exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")

    result = run("google/paligemma2-3b-mix-224")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].endswith("; already cached: google/paligemma-tiny")

    # A repo that is already complete in the cache needs no network.
    again = run("google/paligemma-tiny")
    assert again.exit_code == 0, again.stderr
    assert (Path(again.stdout.strip()) / "model.safetensors").read_bytes() == SAFETENSORS


def test_interrupted_download_resumes_with_a_range_request(hub, monkeypatch):
    # Bytes reach the disk a chunk (10 MiB) at a time; smaller chunks let a 64 KiB file break off after one.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.repos["google/paligemma-tiny"].drop_first_get = {"model.safetensors"}
    result = run("google/paligemma-tiny")

    assert result.exit_code == 0, result.stderr
    gets = [rng for method, path, rng in hub.log if method == "GET" and path.endswith("/model.safetensors")]
    half = len(SAFETENSORS) // 2
    assert gets == [None, f"bytes={half - half % 4096}-"]  # the second request asks only for the rest
    assert (Path(result.stdout.strip()) / "model.safetensors").read_bytes() == SAFETENSORS


def test_bad_repo_id():
    result = run("not a repo")

    assert result.exit_code == 1
    assert "is not a model repository id" in result.stderr


# resolve_model without the Hub


def test_resolve_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PaliGemmaError, match=r"is not a PaliGemma checkpoint folder \(no config.json\)"):
        resolve_model(str(empty))
    with pytest.raises(PaliGemmaError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "missing"))


def test_default_model_from_config_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    config = tmp_path / "config.toml"
    config.write_text(f'model = "{ckpt.as_posix()}"\n')
    monkeypatch.setenv("PALIGEMMA_CONFIG", str(config))

    assert resolve_model(None) == ckpt.resolve()
    assert default_model_source() == f"config:{config}"


def test_no_model_configured(monkeypatch, tmp_path):
    monkeypatch.setattr(model_source, "DEMO_MODEL", tmp_path / "no-demo")

    assert default_model_source() == "none"
    with pytest.raises(PaliGemmaError, match="no model is configured: pass --model, set PALIGEMMA_MODEL"):
        resolve_model(None)


@pytest.mark.parametrize("what", [["google/paligemma-tiny"], ["--vae"]], ids=["model", "vae"])
def test_a_silent_hub_times_out_with_one_line(monkeypatch, what):
    """A server that accepts the connection and never answers: one line after --timeout, not a hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_say_nothing():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        started = time.monotonic()
        result = run(*what, "--timeout", "1")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert result.exit_code == 1 and accepted
    assert result.stderr.splitlines()[-1].startswith("error: ") and "did not answer within 1 s" in result.stderr
    assert "--timeout" in result.stderr and elapsed < 30


def test_local_dir_must_not_hold_other_files(hub, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "config.json").write_text("{\"my\": \"own\"}")
    result = run("google/paligemma-tiny", "--local-dir", str(target))
    assert result.exit_code == 1 and "not downloaded here" in result.stderr
    assert (target / "config.json").read_text() == '{"my": "own"}'
    assert run("google/paligemma-tiny", "--local-dir", str(tmp_path / "new")).exit_code == 0
    assert run("google/paligemma-tiny", "--local-dir", str(tmp_path / "new")).exit_code == 0  # again: resumes
# --- the segmentation VQ-VAE -------------------------------------------------------------------------


VAE_BYTES = b"PK\x03\x04 pretend npz" * 100


@pytest.fixture
def vae_hub(hub):
    hub.repos["spaces/google/paligemma-hf"] = Repo({"vae-oid.npz": VAE_BYTES, "app.py": b"print()"})
    hub.repos["spaces/me/masks"] = Repo({"weights/mine.npz": VAE_BYTES[::-1]})
    return hub


def test_download_vae_from_the_published_space(vae_hub, tmp_path):
    result = run("--vae")
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.name == "vae-oid.npz" and path.read_bytes() == VAE_BYTES
    requested = {p for _, p, _ in vae_hub.log}
    assert any(p.startswith("/spaces/google/paligemma-hf/resolve/") for p in requested)
    assert not any("app.py" in p for p in requested)
    # Found again offline, by segment's lookup, when nothing beside the model or in the config names one.
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    assert model_source.resolve_vae(None, model_folder).read_bytes() == VAE_BYTES


def test_download_vae_local_dir_must_not_hold_other_files(vae_hub, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "vae-oid.npz").write_bytes(b"my own")
    result = run("--vae", "--local-dir", str(target))
    assert result.exit_code == 1 and "not downloaded here" in result.stderr
    assert (target / "vae-oid.npz").read_bytes() == b"my own"
    fresh = run("--vae", "--local-dir", str(tmp_path / "new"))
    assert fresh.exit_code == 0 and Path(fresh.stdout.strip()).read_bytes() == VAE_BYTES


def test_download_model_and_vae_together(vae_hub):
    result = run("google/paligemma-tiny", "--vae")
    assert result.exit_code == 0, result.stderr
    folder, vae = map(Path, result.stdout.split())
    assert (folder / "config.json").is_file() and vae.read_bytes() == VAE_BYTES


def test_download_vae_from_a_configured_repo(vae_hub, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('vae_repo = "spaces/me/masks"\nvae_file = "weights/mine.npz"\n')
    monkeypatch.setenv("PALIGEMMA_CONFIG", str(config))
    result = run("--vae")
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == VAE_BYTES[::-1]
    assert model_source.resolve_vae(None, tmp_path).read_bytes() == VAE_BYTES[::-1]
    monkeypatch.delenv("PALIGEMMA_CONFIG")
    flags = run("--vae", "--vae-repo", "spaces/me/masks", "--vae-file", "weights/mine.npz")
    assert flags.exit_code == 0 and Path(flags.stdout.strip()).read_bytes() == VAE_BYTES[::-1]


@pytest.mark.parametrize("args, message", [
    ((), "give a model id"),
    (("google/paligemma-tiny", "--vae-repo", "spaces/me/masks"), "--vae-repo and --vae-file go with --vae"),
    (("--vae", "--vae-file", "nope.npz"), "'spaces/google/paligemma-hf' holds no file 'nope.npz'"),
    (("--vae", "--vae-repo", "spaces/nobody/here"), "no such space repository 'nobody/here'"),
])
def test_download_vae_errors(vae_hub, args, message):
    result = run(*args)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_vae_is_looked_for_in_order(tmp_path, monkeypatch):
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    with pytest.raises(PaliGemmaError, match=r"^no VQ-VAE to decode masks with: put vae-oid.npz beside the model "
                                             rf"in {model_folder}, pass --vae PATH, add vae = \"PATH\" to .*config.toml, "
                                             r"or run `paligemma download --vae`$"):
        model_source.resolve_vae(None, model_folder)
    configured = tmp_path / "configured.npz"
    configured.write_bytes(b"c")
    config = tmp_path / "config.toml"
    config.write_text(f'vae = "{configured}"\n')
    monkeypatch.setenv("PALIGEMMA_CONFIG", str(config))
    assert model_source.resolve_vae(None, model_folder) == configured
    (model_folder / "vae-oid.npz").write_bytes(b"b")
    assert model_source.resolve_vae(None, model_folder) == model_folder / "vae-oid.npz"
    explicit = tmp_path / "explicit.npz"
    explicit.write_bytes(b"e")
    assert model_source.resolve_vae(str(explicit), model_folder) == explicit
    with pytest.raises(PaliGemmaError, match="--vae 'missing.npz' does not exist"):
        model_source.resolve_vae("missing.npz", model_folder)
    config.write_text('vae = "/nowhere/vae.npz"\n')
    (model_folder / "vae-oid.npz").unlink()
    with pytest.raises(PaliGemmaError, match='vae = "/nowhere/vae.npz" does not exist'):
        model_source.resolve_vae(None, model_folder)
