"""scripts/download_weights.py without the network: a local HTTP server on 127.0.0.1 serves small
fake files under the real names, both as plain HTTPS-style downloads (LAVIS) and as a Hugging Face
Hub (`resolve/<revision>/<file>` with the Hub's headers) that huggingface_hub is pointed at."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinygpt_v.checkpoints.download import (ChecksumError, DownloadError, OfflineError, fetch_url, load_manifest,
                                            plan)

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "ef382358ec9e382308935a992d908de099b64c23"


class FakeServer(BaseHTTPRequestHandler):
    """GET/HEAD with Range; `cut` (path -> bytes) ends the first response to a path early, as a
    dropped connection; `/{repo}/resolve/{rev}/{file}` answers as the Hub does."""
    files: dict[str, bytes] = {}
    etags: dict[str, str] = {}     # Hub path -> ETag (the sha256 of an LFS file)
    cut: dict[str, int] = {}
    ranges: list[str] = []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            if "/resolve/" in self.path:  # as the Hub answers for a file a revision lacks
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if "Range" in self.headers:
            self.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        if "/resolve/" in self.path:
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{self.etags.get(self.path, hashlib.sha256(data).hexdigest())}"')
        self.end_headers()
        if body:
            payload = data[start:]
            if body and self.path in self.cut:
                payload = payload[: self.cut.pop(self.path)]
            self.wfile.write(payload)
            if len(payload) < len(data) - start:
                self.close_connection = True


@pytest.fixture
def server():
    FakeServer.files, FakeServer.etags, FakeServer.cut, FakeServer.ranges = {}, {}, {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fake_bytes(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


# --- plain HTTP (the LAVIS files) -----------------------------------------------------------------

def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    data = fake_bytes(300_000)
    FakeServer.files["/LAVIS/models/BLIP2/eva_vit_g.pth"] = data
    FakeServer.cut["/LAVIS/models/BLIP2/eva_vit_g.pth"] = 120_000
    url, dest = server + "/LAVIS/models/BLIP2/eva_vit_g.pth", tmp_path / "weights" / "eva_vit_g.pth"
    with pytest.raises(DownloadError, match="stopped at 120000 of 300000 bytes.*again to resume"):
        fetch_url(url, dest, progress=False)
    part = dest.with_name("eva_vit_g.pth.part")
    assert not dest.exists() and part.stat().st_size == 120_000
    digest = fetch_url(url, dest, size=len(data), sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert FakeServer.ranges == ["bytes=120000-"]
    assert dest.read_bytes() == data and not part.exists()
    assert digest == hashlib.sha256(data).hexdigest()


def test_checksum_mismatch_is_one_clear_error_and_leaves_no_file(server, tmp_path):
    FakeServer.files["/blip2_pretrained_flant5xxl.pth"] = fake_bytes(5000)
    dest = tmp_path / "blip2_pretrained_flant5xxl.pth"
    with pytest.raises(ChecksumError, match=r"blip2_pretrained_flant5xxl.pth.*sha256 [0-9a-f]{64}, expected 0{64}"
                                            r".*deleted"):
        fetch_url(server + "/blip2_pretrained_flant5xxl.pth", dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_refused_before_hashing(server, tmp_path):
    FakeServer.files["/eva_vit_g.pth"] = fake_bytes(1000)
    with pytest.raises(DownloadError, match="1000 of 2000 bytes"):
        fetch_url(server + "/eva_vit_g.pth", tmp_path / "eva_vit_g.pth", size=2000, progress=False)
    assert not (tmp_path / "eva_vit_g.pth").exists()


def test_unreachable_server_is_reported_as_offline(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OfflineError, match=f"cannot reach 127.0.0.1:{port}"):
        fetch_url(f"http://127.0.0.1:{port}/eva_vit_g.pth", tmp_path / "eva_vit_g.pth", progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == []


# --- the whole tool: manifest, Hub through huggingface_hub, offline ----------------------------

def run_tool(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("download_weights", ROOT / "scripts" / "download_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def fake_world(server: str, tmp_path: Path, sha_of: dict | None = None) -> Path:
    """A manifest like the real one (same entries and file names) pointing at the fake server."""
    manifest = load_manifest()
    files = {}
    for name in ("eva_vit_g", "blip2_qformer", "phi2", "stage4"):
        entry = json.loads(json.dumps(manifest["files"][name]))
        if entry["kind"] == "url":
            path = "/LAVIS/" + entry["dest"]
            entry["url"] = server + path
            FakeServer.files[path] = fake_bytes(2048, seed=len(files))
        else:
            entry["revision"] = COMMIT
            for filename in entry["files"]:
                path = f"/{entry['repo_id']}/resolve/{COMMIT}/{filename}"
                FakeServer.files[path] = fake_bytes(700, seed=len(filename))
        files[name] = entry
    for (name, filename), sha in (sha_of or {}).items():
        if filename is None:
            files[name]["sha256"] = sha
        else:
            files[name]["files"][filename]["sha256"] = sha
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": files, "sets": {"4": list(files)}}))
    return path


@pytest.fixture
def hub_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")
    # tests/conftest.py makes the session offline; huggingface_hub reads that once, at import
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return server


def test_stage4_downloads_everything_through_the_hub_cache(hub_env, tmp_path, capsys):
    manifest = fake_world(hub_env, tmp_path)
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "4", "--dir", str(weights), "--manifest", str(manifest), "--no-progress"]) == 0
    config = f"/microsoft/phi-2/resolve/{COMMIT}/config.json"
    assert (weights / "phi-2" / "config.json").read_bytes() == FakeServer.files[config]
    assert (weights / "TinyGPT-V_for_Stage4.pth").read_bytes() == \
        FakeServer.files[f"/Tyrannosaurus/TinyGPT-V/resolve/{COMMIT}/TinyGPT-V_for_Stage4.pth"]
    assert (weights / "eva_vit_g.pth").read_bytes() == FakeServer.files["/LAVIS/eva_vit_g.pth"]
    snapshot = tmp_path / "hub-cache" / "models--microsoft--phi-2" / "snapshots" / COMMIT / "config.json"
    assert snapshot.exists()  # huggingface_hub's own cache layout
    out = capsys.readouterr().out
    # every computed sha256 is printed, for manifest entries still null
    assert hashlib.sha256(FakeServer.files[config]).hexdigest() in out and "not in the manifest" in out
    # a second run offline finds everything in place or in the Hub cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert run_tool(["--dir", str(weights), "--manifest", str(manifest), "--no-progress", "--offline"]) == 0
    finally:
        del os.environ["HF_HUB_OFFLINE"]


def test_hub_file_whose_content_differs_from_its_sha256_is_deleted(hub_env, tmp_path, capsys):
    manifest = fake_world(hub_env, tmp_path)
    bad = f"/Tyrannosaurus/TinyGPT-V/resolve/{COMMIT}/TinyGPT-V_for_Stage4.pth"
    FakeServer.etags[bad] = "a" * 64  # the Hub says this sha256; the bytes say otherwise
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "4", "--dir", str(weights), "--manifest", str(manifest), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "TinyGPT-V_for_Stage4.pth" in out and "expected " + "a" * 64 in out
    assert not (weights / "TinyGPT-V_for_Stage4.pth").exists()
    blobs = tmp_path / "hub-cache" / "models--Tyrannosaurus--TinyGPT-V" / "blobs"
    assert not any(blobs.iterdir())


def test_recorded_sha256_mismatch_for_a_lavis_file(hub_env, tmp_path, capsys):
    manifest = fake_world(hub_env, tmp_path, sha_of={("eva_vit_g", None): "b" * 64})
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "4", "--dir", str(weights), "--manifest", str(manifest), "--no-progress"]) == 1
    assert "expected " + "b" * 64 in capsys.readouterr().out
    assert not (weights / "eva_vit_g.pth").exists() and not (weights / "eva_vit_g.pth.part").exists()


def test_offline_with_nothing_local_says_what_to_copy_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "4", "--dir", str(weights), "--offline", "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "Offline" in out
    assert ("https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth\n"
            f"      -> {weights / 'eva_vit_g.pth'}") in out
    assert f"https://huggingface.co/Tyrannosaurus/TinyGPT-V/resolve/main/TinyGPT-V_for_Stage4.pth\n" \
           f"      -> {weights / 'TinyGPT-V_for_Stage4.pth'}" in out
    assert "microsoft/phi-2/resolve/" in out and str(weights / "phi-2" / "model-00001-of-00002.safetensors") in out
    assert not weights.exists() or not any(p.is_file() for p in weights.rglob("*"))


def test_offline_uses_a_hub_cache_copied_by_hand(tmp_path, monkeypatch):
    """The real cache layout (blobs named by sha256, snapshots/<commit>/ links, refs/main)."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--Tyrannosaurus--TinyGPT-V"
    data = fake_bytes(999)
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).write_bytes(data)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "TinyGPT-V_for_Stage4.pth").symlink_to(f"../../blobs/{sha}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "stage4", "--dir", str(weights), "--offline", "--no-progress"]) == 0
    assert (weights / "TinyGPT-V_for_Stage4.pth").read_bytes() == data


def test_files_placed_by_hand_are_checked_not_fetched(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "eva_vit_g.pth").write_bytes(b"copied by hand")
    assert run_tool(["--stage", "eva_vit_g", "--dir", str(weights), "--offline"]) == 0
    assert "present" in capsys.readouterr().out


def test_real_manifest_covers_every_stage_and_config_path():
    manifest = load_manifest()
    names = {spec.dest.as_posix() for spec in plan(manifest, "all", "weights")}
    # the paths configs/models/tinygpt_v.yaml points at
    assert {"weights/eva_vit_g.pth", "weights/blip2_pretrained_flant5xxl.pth"} <= names
    assert {f"weights/TinyGPT-V_for_Stage{i}.pth" for i in range(1, 5)} <= names
    assert {"weights/phi-2/config.json", "weights/phi-2/model.safetensors.index.json"} <= names
    for stage in "1234":
        assert {s.entry for s in plan(manifest, stage, "w")} == {"eva_vit_g", "blip2_qformer", "phi2", f"stage{stage}"}
    phi = manifest["files"]["phi2"]
    assert len(phi["revision"]) == 40  # pinned to a commit, not a branch
    with pytest.raises(DownloadError, match="unknown weight set or entry.*stage9"):
        plan(manifest, "stage9", "w")


def test_convert_flag_converts_an_old_layout_phi2_in_the_same_run(tmp_path, monkeypatch, capsys):
    """A Phi-2 copied by hand in the original's fused layout is converted once, now."""
    import shutil
    monkeypatch.setenv("TINYGPT_V_CACHE", str(tmp_path / "cache"))
    fused = ROOT / "tests" / "fixtures" / "phi2_layouts" / "fused"
    weights = tmp_path / "weights"
    shutil.copytree(fused, weights / "phi-2")
    manifest = tmp_path / "manifest.json"
    entry = {"kind": "hub", "repo_id": "microsoft/phi-2", "revision": COMMIT, "dest": "phi-2",
             "files": {name: {"size": (fused / name).stat().st_size, "sha256": None}
                       for name in ("config.json", "model.safetensors")}}
    manifest.write_text(json.dumps({"files": {"phi2": entry}, "sets": {"base": ["phi2"]}}))
    assert run_tool(["--stage", "base", "--dir", str(weights), "--manifest", str(manifest), "--offline",
                     "--convert"]) == 0
    out = capsys.readouterr().out
    assert "fused query_key_value" in out and str(tmp_path / "cache") in out
    from tinygpt_v.checkpoints.phi2_layout import TODAY, detect_layout
    converted = next((tmp_path / "cache" / "phi2_today_layout").iterdir())
    assert detect_layout(converted) == TODAY


def test_optional_hub_file_missing_at_the_revision_is_no_error_but_a_required_one_is(hub_env, tmp_path, capsys,
                                                                                    monkeypatch):
    manifest = fake_world(hub_env, tmp_path)
    del FakeServer.files[f"/microsoft/phi-2/resolve/{COMMIT}/special_tokens_map.json"]  # optional
    weights = tmp_path / "weights"
    assert run_tool(["--dir", str(weights), "--manifest", str(manifest), "--no-progress"]) == 0
    assert "absent" in capsys.readouterr().out
    del FakeServer.files[f"/microsoft/phi-2/resolve/{COMMIT}/tokenizer.json"]  # required
    (weights / "phi-2" / "tokenizer.json").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh-cache"))  # a commit's cached files need no request
    assert run_tool(["--dir", str(weights), "--manifest", str(manifest), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "tokenizer.json: no such file in microsoft/phi-2" in out


def test_downloaded_phi2_folder_of_cache_links_loads_with_the_reference_logits(hub_env, tmp_path, monkeypatch):
    """End to end: a (tiny) Phi-2 in the original's fused layout served by the fake Hub, fetched
    into weights/phi-2 (links into the Hub cache), then `llm.pretrained: weights/phi-2`."""
    import torch
    from safetensors.torch import load_file
    from tinygpt_v.models.llm import hf_causal_lm
    monkeypatch.setenv("TINYGPT_V_CACHE", str(tmp_path / "cache"))
    fused = ROOT / "tests" / "fixtures" / "phi2_layouts" / "fused"
    files = ("config.json", "model.safetensors")
    for name in files:
        FakeServer.files[f"/microsoft/phi-2/resolve/{COMMIT}/{name}"] = (fused / name).read_bytes()
    entry = {"kind": "hub", "repo_id": "microsoft/phi-2", "revision": COMMIT, "dest": "phi-2",
             "files": {name: {"size": None, "sha256": None} for name in files}}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": {"phi2": entry}, "sets": {"base": ["phi2"]}}))
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "base", "--dir", str(weights), "--manifest", str(manifest), "--no-progress"]) == 0
    assert (weights / "phi-2" / "model.safetensors").is_symlink()
    expected = load_file(ROOT / "tests" / "fixtures" / "phi2_layouts" / "expected.safetensors")
    llm = hf_causal_lm(pretrained=str(weights / "phi-2"), dtype="fp32", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = llm(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits_fused"], rtol=1e-4, atol=1e-4)


def test_revision_override_and_its_errors(hub_env, tmp_path, capsys):
    manifest = fake_world(hub_env, tmp_path)
    for filename in load_manifest()["files"]["stage4"]["files"]:
        FakeServer.files[f"/Tyrannosaurus/TinyGPT-V/resolve/v1.0/{filename}"] = b"tagged release"
    weights = tmp_path / "weights"
    assert run_tool(["--stage", "stage4", "--dir", str(weights), "--manifest", str(manifest), "--no-progress",
                     "--revision", "stage4=v1.0"]) == 0
    assert (weights / "TinyGPT-V_for_Stage4.pth").read_bytes() == b"tagged release"
    assert f"revision v1.0 is commit {COMMIT}: pin it in the manifest" in capsys.readouterr().out
    assert run_tool(["--manifest", str(manifest), "--revision", "eva_vit_g=main"]) == 1
    assert "expected HUB_ENTRY=REVISION" in capsys.readouterr().err
