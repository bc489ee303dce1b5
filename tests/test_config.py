"""The `rmc run` configuration rejects bad model settings before any work, with a clear RMCError."""

import pytest

from rmc.cli.config import ModelConfig, documented_yaml, load_config
from rmc.errors import RMCError


@pytest.mark.parametrize("kwargs, match", [
    ({"bases": ["bogus"]}, "model.bases"),
    ({"bases": []}, "model.bases"),
    ({"bases": ["standard", "standard"]}, "model.bases"),
    ({"denoise_op": "xx"}, "model.denoise_op"),
    ({"layer": ""}, "model.layer"),
    ({"layer": 3}, "model.layer"),
])
def test_model_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(RMCError, match=match):
        ModelConfig(**kwargs).validate()


def test_model_config_accepts_good_settings():
    cfg = ModelConfig(bases=["standard", "adversarial", "denoising"], denoise_op="mean", layer="fc1")
    assert cfg.validate() is cfg
    assert ModelConfig().validate().layer is None


@pytest.mark.parametrize("key, value", [("model.bases", ["bogus"]), ("model.denoise_op", "xx"),
                                        ("model.layer", "")])
def test_load_config_checks_model_section(key, value):
    with pytest.raises(RMCError, match=key):
        load_config(overrides=[(key, value)])


def test_printed_config_keeps_continued_comments():
    """A field comment continued on aligned comment-only lines is printed whole by --print-config."""
    text = documented_yaml(load_config())
    line = next(x for x in text.splitlines() if x.strip().startswith("rmc_n:"))
    assert "the static and kNN rows use all n" in line and "folder key" in line
