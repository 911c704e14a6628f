"""Config loading: presets, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import CONFIG_DIR, ExperimentConfig, load_config
from translator.config import ConfigError


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(str(path))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.n_layers == 6
    assert cfg.model.vocab_size == cfg.data.vocab_size


def test_presets_load_by_name():
    assert load_config("cpu").model.d_model == 256
    assert load_config("base").model.d_model == 512
    assert load_config("big").model.d_model == 1024


def test_dotted_overrides_are_typed():
    cfg = load_config("cpu", ["train.lr=5e-4", "model.norm_first=false", "train.betas=[0.9, 0.99]"])
    assert cfg.train.lr == 5e-4 and cfg.model.norm_first is False and cfg.train.betas == (0.9, 0.99)


def test_data_vocab_size_sizes_the_model():
    assert load_config("cpu", ["data.vocab_size=1000"]).model.vocab_size == 1000


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key train.lrr"),
        ("modle.d_model=1", "unknown config key modle"),
        ("train.lr=fast", "train.lr must be float"),
        ("train.max_tokens=1.5", "train.max_tokens must be int"),
        ("model.norm_first=3", "model.norm_first must be true or false"),
        ("model.n_heads=3", "divisible by model.n_heads"),
        ("model.d_ff=-4", "model.d_ff must be positive"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("data.tgt_lang=en", "both 'en'"),
        ("data.spm_model_type=word", "data.spm_model_type must be one of"),
        ("data.max_len=1000", "data.max_len"),
        ("train.betas=[0.9]", "train.betas must have 2 items"),
        ("data.subword_alpha=-0.1", "data.subword_alpha must be >= 0, got -0.1"),
    ],
)
def test_bad_values_fail_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("cpu", [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.spm_model_type=bpe", "data.subword_alpha=1.0"], r"data.subword_alpha must be in \[0, 1\) for a bpe model"),
        (["data.streaming=true", "data.subword_alpha=0.5"], "data.subword_alpha needs the train split in memory"),
    ],
)
def test_subword_alpha_outside_what_its_model_and_data_allow_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu", overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_is_named_with_its_line_on_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dropout: 0.1\n\td_ff: 512\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(e.value) == (f"config file {bad} is not valid YAML: found character '\\t' that cannot start any token "
                            "at line 3, column 1")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfemodel: {}\n", "is not UTF-8 text (byte 0xff at offset 0)"),
    (None, "is a directory"),
])
def test_a_config_that_is_not_text_is_named(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == f"config file {path} {message}"


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="cpu"):
        load_config("tiny-nonexistent")


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("cpu", ["train.lr"])


def test_flag_values_are_never_parsed_as_yaml(tmp_path):
    from translator.serve_cli import parse_config

    odd = ["runs/dir #2/model.pt", "yes", "key: value.pem", "[a].pt", "0x10", "~"]
    for path in odd:
        cfg = parse_config(["--checkpoint", path, "--tls-cert", path, "--tls-key", path, "--auth-token-file", path,
                            "--port", "0", "limits.max_sentences=32"])
        assert (cfg.checkpoint, cfg.tls.cert_file, cfg.tls.key_file, cfg.auth_token_file) == (path,) * 4
        assert cfg.limits.max_sentences == 32  # dotted overrides stay typed
    assert load_config("cpu", ["train.lr=5e-4"], {"train.max_minutes": 1.5}).train.max_minutes == 1.5


def test_a_checkpoint_path_with_a_hash_is_served(tmp_path, toy_tokenizer):
    from tests.test_server import LIMITS, SENTENCES, write_checkpoint
    from translator.client import TranslatorClient
    from translator.serve_cli import parse_config
    from translator.server import create_server

    (tmp_path / "dir #2").mkdir()
    path = write_checkpoint(tmp_path / "dir #2" / "model.pt", toy_tokenizer)
    cfg = parse_config(["--checkpoint", str(path), "--port", "0", "decoding.max_len=4",
                        f"limits.max_length={LIMITS.max_length}"])
    srv, port = create_server(cfg)
    srv.start()
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=60, retries=0) as client:
            assert client.model_info().model.name == "model.pt"
            assert len(client.translate_text(SENTENCES[:1])) == 1
    finally:
        srv.stop()
