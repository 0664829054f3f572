"""Config loading: defaults, --options, and load-time errors that name the key and the file."""
from __future__ import annotations

import textwrap

import pytest

from tests.conftest import REPO
from tinygpt_v.config import load_config
from tinygpt_v.registry import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def tiny_with(tmp_path, body):
    return write(tmp_path, "exp.yaml", f"defaults: [{REPO}/configs/models/tiny.yaml]\n" + textwrap.dedent(body))


def test_defaults_merge_then_file_then_options(tmp_path):
    path = tiny_with(tmp_path, """
        model:
          max_txt_len: 64
          llm: {config: {num_hidden_layers: 3}}
    """)
    cfg = load_config(path, ["model.max_txt_len=80", "model.lora.r=4"])
    assert cfg.model.max_txt_len == 80                    # --options beat the file
    assert cfg.model.llm.config.num_hidden_layers == 3    # the file beats its defaults
    assert cfg.model.llm.config.hidden_size == 64         # untouched defaults survive the merge
    assert cfg.model.lora.r == 4


def test_defaults_are_found_in_the_configs_folder_by_relative_name(tmp_path):
    path = write(REPO / "configs", "_test_relative.yaml", "defaults: [models/tiny.yaml]\n")
    try:
        assert load_config(path).model.vision.width == 64
    finally:
        path.unlink()


def test_misspelt_key_names_key_path_and_file(tmp_path):
    path = tiny_with(tmp_path, """
        model:
          vision: {dept: 3}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.vision.dept" in message and "did you mean 'depth'" in message and str(path) in message


def test_misspelt_key_from_options_is_blamed_on_options(tmp_path):
    with pytest.raises(ConfigError, match=r"model.max_text_len: unknown key .*max_txt_len.*--options"):
        load_config(REPO / "configs/models/tiny.yaml", ["model.max_text_len=3"])


def test_wrong_type_names_the_key(tmp_path):
    path = tiny_with(tmp_path, "model: {max_txt_len: lots}\n")
    with pytest.raises(ConfigError, match=r"model.max_txt_len: expected int, got str 'lots'"):
        load_config(path)
    path = tiny_with(tmp_path, "model: {lora: {r: 8.5}}\n")
    with pytest.raises(ConfigError, match=r"model.lora.r: expected int"):
        load_config(path)


def test_missing_pretrained_path_names_the_path(tmp_path):
    missing = tmp_path / "weights" / "eva_vit_g.pth"
    path = tiny_with(tmp_path, f"model: {{vision: {{pretrained: {missing}}}}}\n")
    with pytest.raises(ConfigError, match=rf"model.vision.pretrained: path does not exist: {missing}"):
        load_config(path)


def test_hub_ids_are_not_taken_for_missing_paths(tmp_path):
    path = tiny_with(tmp_path, "model: {tokenizer: {name: hf, path: microsoft/phi-2}}\n")
    assert load_config(path).model.tokenizer.path == "microsoft/phi-2"
    path = tiny_with(tmp_path, "model: {tokenizer: {name: hf, path: ./my/phi-2}}\n")
    with pytest.raises(ConfigError, match="model.tokenizer.path: path does not exist: ./my/phi-2"):
        load_config(path)


def test_unknown_part_name_lists_the_registered_ones(tmp_path):
    path = tiny_with(tmp_path, "model: {vision: {name: eva_vit_h}}\n")
    with pytest.raises(ConfigError, match=r"model.vision.name: unknown vision encoder 'eva_vit_h'.*eva_vit_g"):
        load_config(path)


def test_unknown_section_and_unparsable_yaml(tmp_path):
    path = tiny_with(tmp_path, "modle: {}\n")
    with pytest.raises(ConfigError, match="modle: unknown top-level section"):
        load_config(path)
    bad = write(tmp_path, "bad.yaml", "model:\n  vision: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*line|line.*bad.yaml"):
        load_config(bad)


def test_missing_config_and_include_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "inc.yaml", "defaults: [models/absent.yaml]\n")
    with pytest.raises(ConfigError, match=r"defaults: config file not found: .*absent.yaml \(looked in: .*\) \(set in .*inc.yaml\)"):
        load_config(path)


def test_builder_arguments_set_by_code_cannot_be_set_in_yaml(tmp_path):
    path = tiny_with(tmp_path, "model: {connector: {in_width: 5}}\n")
    with pytest.raises(ConfigError, match="model.connector.in_width: is set by code"):
        load_config(path)


def test_a_part_whose_name_changes_is_replaced_not_merged(tmp_path):
    path = tiny_with(tmp_path, "model: {tokenizer: {name: hf, path: microsoft/phi-2}}\n")
    tokenizer = load_config(path).model.tokenizer
    assert dict(tokenizer) == {"name": "hf", "path": "microsoft/phi-2"}  # toy_bpe's vocab_size is gone
    path = tiny_with(tmp_path, "model: {tokenizer: {vocab_size: 512}}\n")
    assert dict(load_config(path).model.tokenizer) == {"name": "toy_bpe", "vocab_size": 512}


def test_hub_ids_with_dots_are_hub_ids_but_file_names_are_paths(tmp_path):
    from tinygpt_v.registry import looks_like_local_path
    assert not looks_like_local_path("Salesforce/blip2-opt-2.7b")
    assert looks_like_local_path("weights/eva_vit_g.pth") and looks_like_local_path("./phi-2")
    assert looks_like_local_path("output/stage1/checkpoint_final")  # two slashes: a folder
