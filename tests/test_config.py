import pytest

from deltamask.config import Config, ConfigError, build_config, describe, from_sources, load_toml


def test_defaults_are_valid_and_cover_the_required_keys() -> None:
    cfg = Config()
    build_config(cfg.to_dict())
    required = "method model dataset rounds num_clients clients_per_round local_epochs batch_size seed codec kappa image_size partition alpha device weights"
    keys = {k for k, *_ in describe()}
    assert set(required.split()) <= keys
    assert all(h for *_, h in describe()), "every key has a help text"


def test_overrides_from_strings_and_kebab_case() -> None:
    cfg = build_config({"rounds": "7", "local-epochs": "2", "kappa": "0.5", "weighted": "true"}, from_strings=True)
    assert (cfg.rounds, cfg.local_epochs, cfg.kappa, cfg.weighted) == (7, 2, 0.5, True)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"roundz": 3}, "unknown config key 'roundz'"),
        ({"rounds": "many"}, "'rounds' expects int"),
        ({"weighted": "maybe"}, "'weighted' expects bool"),
        ({"partition": "random"}, "'partition' must be one of"),
        ({"method": "fedsgd"}, "unknown method 'fedsgd'"),
        ({"codec": "zip"}, "unknown uplink codec 'zip'"),
        ({"clients_per_round": "20"}, "clients_per_round"),
        ({"kappa": "0"}, "kappa"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        build_config(overrides, from_strings=True)


def test_toml_preset_and_sets(tmp_path) -> None:
    p = tmp_path / "x.toml"
    p.write_text('method = "fedpm"\nrounds = 4\n')
    cfg = from_sources(str(p), ["rounds=5"])
    assert cfg.method == "fedpm" and cfg.rounds == 5
    p.write_text("[deltamask]\nrounds = 2\n")
    assert load_toml(p)["rounds"] == 2
    p.write_text("rounds = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_type_errors_in_toml() -> None:
    with pytest.raises(ConfigError, match="'rounds' expects int"):
        build_config({"rounds": "3"})  # a TOML string where an int is needed


def test_presets_in_configs_folder_are_valid() -> None:
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert presets, "configs/*.toml presets ship with the project"
    for p in presets:
        from_sources(str(p))
