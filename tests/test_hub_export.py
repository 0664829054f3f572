"""Export to the Hugging Face Hub convention: config.json (AutoConfig), generation_config.json,
adapter_config.json (PeftConfig), a model card; `--push-to-hub` through huggingface_hub's
upload against a local fake Hub on 127.0.0.1 (never the network)."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_section

from tinygpt_v.checkpoints import CheckpointError
from tinygpt_v.models import TinyGPTV, build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    section = tiny_model_section()
    model = build_model(section, verbose=False)
    folder = tmp_path_factory.mktemp("hub") / "tinygpt_v_tiny"
    model.save_pretrained(folder, section)
    return model, folder, section


def test_config_json_is_read_by_autoconfig_and_names_the_architecture(exported):
    from transformers import AutoConfig, PhiConfig
    model, folder, section = exported
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "tinygpt_v" and raw["architectures"] == ["TinyGPTV"]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "tinygpt_v"
    # the LLM's config is complete enough for transformers to rebuild it
    text = PhiConfig(**{k: v for k, v in config.text_config.items() if k != "model_type"})
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (64, 2, 1024)
    assert text.qk_layernorm is True
    assert config.vision_config["width"] == section["vision"]["width"]
    assert config.tinygpt_v["num_parameters"]["total"] == sum(p.numel() for p in model.parameters())


def test_generation_config_and_peft_adapter_config_are_readable(exported):
    from peft import PeftConfig
    from transformers import GenerationConfig
    model, folder, section = exported
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.max_new_tokens == 300 and generation.do_sample is False
    assert generation.eos_token_id == model.tokenizer.eos_token_id
    adapter = PeftConfig.from_pretrained(folder)
    assert adapter.peft_type == "LORA" and adapter.r == section["lora"]["r"]
    assert set(adapter.target_modules) == set(section["lora"]["target_modules"])
    assert adapter.lora_alpha == section["lora"]["alpha"]


def test_export_still_round_trips_with_the_hub_files(exported):
    model, folder, _ = exported
    again = TinyGPTV.from_pretrained(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_card_states_architecture_stages_scores_and_licences(exported, tmp_path):
    from tinygpt_v.checkpoints.hub_export import load_scores, write_model_card
    _, folder, _ = exported
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: tinygpt_v" in card
    for heading in ("## Architecture", "## Training stages", "## Scores", "## Licences"):
        assert heading in card
    assert "No scores were measured" in card
    for licence in ("MIT", "BSD-3-Clause"):
        assert licence in card
    summary = {"model": "stage4", "scorings": ["official", "original"],
               "benchmarks": {"gqa": {"samples": 12578, "official": {"accuracy": 33.61},
                                      "original": {"accuracy": 38.12}}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    copy = tmp_path / "card"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    card = write_model_card(copy, load_scores(path)).read_text()
    assert "| gqa | accuracy | 33.61 | 38.12 | 12578 |" in card
    (tmp_path / "bad.json").write_text('{"benchmarks": 1}')
    with pytest.raises(CheckpointError, match="bad.json.*summary.json"):
        load_scores(tmp_path / "bad.json")


# --- push to a fake Hub ------------------------------------------------------------------------

class FakeHub(BaseHTTPRequestHandler):
    """What huggingface_hub's create_repo / upload_folder call: repo creation, preupload (every
    file 'regular', i.e. sent inline), commit (ndjson with base64 contents)."""
    calls: list[str] = []
    committed: dict[str, bytes] = {}
    metadata: list = []

    def log_message(self, *args):
        pass

    def _json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip
            body = gzip.decompress(body)
        self.calls.append(f"POST {self.path}")
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            name = json.loads(body)
            repo = f"{name.get('organization')}/{name['name']}" if name.get("organization") else name["name"]
            return self._json({"url": f"{endpoint}/{repo}", "name": repo})
        if self.path == "/api/validate-yaml":  # the Hub checks the model card's metadata block
            import yaml
            content = json.loads(body)["content"]
            metadata = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
            self.metadata.append(metadata)
            ok = isinstance(metadata, dict) and isinstance(metadata.get("tags"), list)
            return self._json({"errors": [] if ok else [{"message": "bad metadata"}], "warnings": []},
                              200 if ok else 400)
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    self.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._json({"commitUrl": f"{endpoint}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40})
        self._json({"error": f"not faked: {self.path}"}, 404)

    def do_GET(self):
        self.calls.append(f"GET {self.path}")
        self._json({"error": f"not faked: {self.path}"}, 404)


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.calls, FakeHub.committed, FakeHub.metadata = [], {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # tests/conftest.py makes the session offline; huggingface_hub reads that once, at import
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield endpoint
    httpd.shutdown()
    httpd.server_close()


def test_push_to_hub_uploads_every_file_of_the_folder(exported, fake_hub):
    from tinygpt_v.checkpoints.hub_export import push_to_hub
    _, folder, _ = exported
    url = push_to_hub(folder, "someone/tinygpt-v-tiny")
    assert url.startswith(fake_hub) and "someone/tinygpt-v-tiny" in url
    assert FakeHub.calls[0] == "POST /api/repos/create"
    expected = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert FakeHub.committed == expected
    assert {"config.json", "README.md", "model.safetensors", "generation_config.json"} <= set(expected)
    assert FakeHub.metadata[0]["library_name"] == "tinygpt_v"  # the card's YAML block parsed


def test_convert_checkpoint_export_with_scores_and_push(fake_hub, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    scores = tmp_path / "summary.json"
    scores.write_text(json.dumps({"model": "tiny", "scorings": ["official"],
                                  "benchmarks": {"vsr": {"samples": 3, "official": {"accuracy": 66.67}}}}))
    out = tmp_path / "export"
    assert script.main(["export", "--config", str(ROOT / "configs/models/tiny.yaml"), "--out", str(out),
                        "--scores", str(scores), "--push-to-hub", "org/tiny"]) == 0
    assert "| vsr | accuracy | 66.67 | 3 |" in (out / "README.md").read_text()
    assert FakeHub.committed["README.md"] == (out / "README.md").read_bytes()
    # a bad scores file: one line naming it, before anything is built or written
    scores.write_text("not json")
    assert script.main(["export", "--config", str(ROOT / "configs/models/tiny.yaml"), "--out",
                        str(tmp_path / "never"), "--scores", str(scores)]) == 1
    assert not (tmp_path / "never").exists()
