"""Settings: one flag, environment variable and docs/settings.md row per setting, their precedence
(flags, environment, config file, defaults), the posterior lists, and what the engine gets."""

from __future__ import annotations

import argparse
import json

import pytest

from ivonserve import cli
from ivonserve.config import Settings, add_cli_arguments
from ivonserve.errors import IvonserveError
from ivonserve.sampler import PRUNE_BY, SamplerConfig


def test_every_setting_has_a_documented_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert field.description, name
        assert f"IVONSERVE_{name.upper()}" in text


def test_every_setting_is_in_the_settings_table():
    from ivonserve.config import repo_root

    table = (repo_root() / "docs" / "settings.md").read_text()
    for name in Settings.model_fields:
        flag, env = "--" + name.replace("_", "-"), f"IVONSERVE_{name.upper()}"
        assert f"| `{flag}` | `{env}` |" in table, name


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("IVONSERVE_POOL_SIZE", "5")
    monkeypatch.setenv("IVONSERVE_PORT", "9001")
    parser = add_cli_arguments(argparse.ArgumentParser())
    settings = Settings.from_cli(parser.parse_args(["--pool-size", "3", "--dtype", "none"]))
    assert settings.pool_size == 3 and settings.port == 9001 and settings.dtype is None
    assert Settings.from_cli(parser.parse_args(["--enforce-eager"])).enforce_eager is True
    with pytest.raises(IvonserveError, match="pool_size"):
        Settings.from_cli(parser.parse_args(["--pool-size", "zero"]))
    with pytest.raises(IvonserveError, match="prune"):
        Settings.from_cli(parser.parse_args(["--prune", "1.5"]))
    with pytest.raises(IvonserveError, match=r"default_selection.*valid: flat"):
        Settings.from_cli(parser.parse_args(["--default-selection", "best"]))
    defaults = Settings()
    assert defaults.pool_size == 5  # from the environment
    (spec,) = defaults.posterior_specs()
    assert str(spec.path).endswith("posteriors/smollm2-135m-gsm8k-epoch")
    assert spec.name == "smollm2-135m-gsm8k-epoch" and spec.kind == "posterior"


def test_config_file_ranks_below_the_environment_and_the_flags(tmp_path, monkeypatch):
    parser = add_cli_arguments(argparse.ArgumentParser())
    toml = tmp_path / "settings.toml"
    toml.write_text('pool_size = 3\nport = 9100\ndefault_n_samples = 2\napi_keys = ["a", "b"]\n')
    monkeypatch.setenv("IVONSERVE_PORT", "9200")
    args = parser.parse_args(["--config", str(toml), "--default-n-samples", "5"])
    settings = Settings.from_cli(args)
    assert settings.pool_size == 3  # the file
    assert settings.port == 9200  # the environment over the file
    assert settings.default_n_samples == 5  # the flag over both
    assert settings.api_key_list() == ["a", "b"]
    assert "a" not in settings.summary().split("api_keys")[1].split("\n")[0]  # masked
    monkeypatch.setenv("IVONSERVE_CONFIG", str(toml))
    assert Settings.build().pool_size == 3  # the file named by the environment
    as_json = tmp_path / "settings.json"
    as_json.write_text(json.dumps({"pool_size": 6}))
    assert Settings.build(config=str(as_json)).pool_size == 6
    for text, message in [("pool_sise = 3", "unknown setting 'pool_sise'"),
                          ("pool_size = ", "not valid TOML")]:  # fmt: skip
        toml.write_text(text)
        with pytest.raises(IvonserveError, match=message):
            Settings.build(config=str(toml))


def test_posteriors_repeat_as_flags_or_commas(monkeypatch, tmp_path):
    parser = add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--posterior", "math=/p/a", "--posterior", "/p/code", "--adapter", "base=/p/adamw"]
    )
    specs = Settings.from_cli(args).posterior_specs()
    assert [(s.name, str(s.path), s.kind) for s in specs] == [
        ("math", "/p/a", "posterior"), ("code", "/p/code", "posterior"),
        ("base", "/p/adamw", "adapter"),
    ]  # fmt: skip
    monkeypatch.setenv("IVONSERVE_POSTERIOR", "x=/p/1, y=/p/2")
    assert [s.name for s in Settings().posterior_specs()] == ["x", "y"]
    monkeypatch.setenv("IVONSERVE_ADAPTER", "/q/adamw")  # adapter alone: no default posterior
    monkeypatch.delenv("IVONSERVE_POSTERIOR")
    assert [s.name for s in Settings().posterior_specs()] == ["adamw"]
    for bad, message in [(["a=/p/1", "a=/p/2"], "used twice"), (["../x=/p"], "NAME"),
                         (["a="], "NAME")]:  # fmt: skip
        with pytest.raises(IvonserveError, match=message):
            Settings.build(posterior=bad).posterior_specs()


def test_the_engine_gets_its_settings_and_no_http_or_keys():
    settings = Settings.build(pool_size=3, prune=0.2, prune_by="random", api_keys=["secret"],
                              max_num_batched_tokens=512, lora_kernel="vllm")  # fmt: skip
    config = settings.engine_config()
    assert config.pool_size == 3 and config.max_num_batched_tokens == 512
    assert config.lora_kernel == "vllm"
    assert config.sampler == SamplerConfig(posterior_temperature=1.0, prune=0.2, prune_by="random")
    assert not hasattr(config, "api_keys") and not hasattr(config, "port")
    assert config.posteriors == tuple(settings.posterior_specs())


def test_the_draws_defaults_have_one_source():
    """The server's settings, `ivonserve sample` and the sampler agree on every default."""
    defaults, settings = SamplerConfig(), Settings()
    assert settings.posterior_temperature == defaults.posterior_temperature
    assert settings.prune == defaults.prune and settings.prune_by == defaults.prune_by
    args = cli.build_parser().parse_args(["sample", "dir", "--draw", "0", "--out", "x"])
    assert (args.posterior_temperature, args.prune, args.prune_by) == (
        defaults.posterior_temperature, defaults.prune, defaults.prune_by,
    )  # fmt: skip
    for spelling in PRUNE_BY:
        assert Settings.build(prune_by=spelling).prune_by == spelling
        cli.build_parser().parse_args(["sample", "d", "--draw", "0", "--out", "x",
                                       "--prune-by", spelling])  # fmt: skip


def test_the_posterior_temperatures_old_names_still_work_with_a_warning(
    monkeypatch, tmp_path, caplog, capsys
):
    """sampling_temperature (serve) and --temperature (sample) are the posterior temperature's
    old names: accepted, with a deprecation warning; the new name wins over the old."""
    caplog.set_level("WARNING", logger="ivonserve.config")
    parser = add_cli_arguments(argparse.ArgumentParser())
    old = Settings.from_cli(parser.parse_args(["--sampling-temperature", "0.5"]))
    assert old.posterior_temperature == 0.5
    assert "deprecated" in caplog.text and "--posterior-temperature" in caplog.text
    monkeypatch.setenv("IVONSERVE_SAMPLING_TEMPERATURE", "0.25")
    assert Settings().posterior_temperature == 0.25
    monkeypatch.setenv("IVONSERVE_POSTERIOR_TEMPERATURE", "2")
    assert Settings().posterior_temperature == 2.0  # the new variable outranks the old one
    monkeypatch.delenv("IVONSERVE_SAMPLING_TEMPERATURE")
    monkeypatch.delenv("IVONSERVE_POSTERIOR_TEMPERATURE")
    toml = tmp_path / "settings.toml"
    toml.write_text("sampling_temperature = 0.75\n")
    assert Settings.build(config=str(toml)).posterior_temperature == 0.75
    assert Settings.build(sampling_temperature=3).posterior_temperature == 3.0
    assert "sampling_temperature" not in Settings.model_fields
    args = cli.build_parser().parse_args(
        ["sample", "d", "--draw", "0", "--out", "x", "--temperature", "0.5"]
    )
    assert args.posterior_temperature == 0.5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--temperature is deprecated" in err
    assert "--posterior-temperature" in err
