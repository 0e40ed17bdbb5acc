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


# --- one place for each piece of knowledge: the fields' metadata, and the key sets derived from it ----------

def test_every_field_says_what_it_changes_and_the_key_sets_follow() -> None:
    from deltamask.config import (BUILTIN_METHODS, CACHE_IGNORED, EFFECTS, FIELDS, HASH_EXCLUDED, RESUME_OVERRIDABLE,
                                  keys_with)

    from deltamask.config import _f

    for k, f in FIELDS.items():
        assert f.metadata["methods"] is None or set(f.metadata["methods"]) <= set(BUILTIN_METHODS), k
    with pytest.raises(ValueError, match="unknown effect"):
        _f(1, "x", effect="resultt")
    with pytest.raises(TypeError):
        _f(1, "x")  # a field must say what it changes: no default effect
    assert set(EFFECTS) == {"data", "result", "length", "storage", "engine", "report"}
    # pinned: a key moved to another effect changes the Flower config hash, what resume accepts or the node cache
    report = {"progress", "max_skipped_rounds", "downhill_rounds", "downhill_drop", "tracking", "tracking_dir", "tracking_experiment"}
    assert HASH_EXCLUDED == report | {"device"}
    assert RESUME_OVERRIDABLE == report | {"device", "rounds"}
    assert keys_with("storage") == {"cache_ram_mb", "prefix_cache", "cache_dir"}
    assert CACHE_IGNORED == set(FIELDS) - {"model", "weights", "dataset", "data_dir", "image_size", "train_samples",
                                           "test_samples", "seed", "cache_dtype", "num_clients", "partition", "alpha",
                                           "min_partition_size", "masked_blocks", "mask_pattern"}


def test_the_derived_sets_are_what_the_engines_use() -> None:
    from deltamask import config
    from deltamask.engines.flower import node_cache, settings
    from deltamask.run import round as round_mod

    assert settings.HASH_EXCLUDED is config.HASH_EXCLUDED
    assert round_mod.RESUME_OVERRIDABLE is config.RESUME_OVERRIDABLE
    assert node_cache.IGNORED_KEYS is config.CACHE_IGNORED
    assert settings.FLOWER_KEYS is config.ENGINE_KEYS
    # the engine keys' defaults live once, in EngineSettings
    s = settings.FlowerSettings()
    assert {k: getattr(s, k.replace("-", "_")) for k in config.ENGINE_KEYS} == {k: v[0] for k, v in config.ENGINE_KEYS.items()}
    # pinned: the engine keys as they were kept by hand (defaults and help), before EngineSettings
    assert config.ENGINE_KEYS == {
        "out-dir": ("", "where the run is written; Flower: an absolute path (empty: ~/deltamask-runs/flower-RUN_ID)"),
        "round-timeout": (600.0, "seconds the server waits for a round's replies; a client not back by then is dropped (Flower; the local engine only when a run sets it)"),
        "node-wait-timeout": (120.0, "Flower: seconds the server waits before round 1 for num-clients nodes; none at all fails the run"),
        "resume": (False, "Flower: continue the interrupted run in out-dir (locally: deltamask run --resume DIR)"),
        "overwrite": (False, "replace a run already in out-dir (otherwise it is refused)"),
    }


def test_hash_excluded_keys_do_not_change_the_flower_config_hash_and_the_rest_do() -> None:
    from deltamask.engines.flower.settings import config_hash

    base = Config()
    # pinned: the defaults' hash; it changes when a default changes or a key that changes results is added
    # (1db6a6c82508313a from 8497b9f until root_samples came in)
    assert config_hash(base) == "a6fb0df4c6a273c7"
    assert config_hash(build_config({"progress": False, "device": "cpu", "downhill_rounds": 0})) == config_hash(base)
    assert config_hash(build_config({"cache_dir": "/x"})) != config_hash(base)  # storage stays in the hash
    assert config_hash(build_config({"rounds": 7})) != config_hash(base)


def test_a_key_the_method_never_reads_is_said_when_the_run_starts() -> None:
    from deltamask.config import stability_warnings, unused_keys

    assert unused_keys(build_config({"qsgd_levels": 8})) == ["qsgd_levels"]
    assert unused_keys(build_config({"method": "qsgd", "qsgd_levels": 8})) == []
    assert unused_keys(build_config({"method": "fedavg", "kappa": 0.3, "lora_rank": 8})) == ["kappa", "lora_rank"]
    assert unused_keys(build_config({"method": "fedpm", "reset_every": 0})) == []  # read by both mask methods
    assert unused_keys(Config(method="fedavg")) == []  # defaults are never reported
    (w,) = stability_warnings(build_config({"method": "fedavg", "kappa": 0.3}))
    assert "kappa=0.3" in w and "deltamask" in w and "fedavg" in w


@pytest.mark.parametrize("key", sorted(__import__("deltamask.config", fromlist=["LIMITS"]).LIMITS))
def test_every_size_limit_at_its_edge(key) -> None:
    """Issue 22: each size a config (or another party's Flower run config) can ask for has an upper bound:
    the limit itself is accepted, one past it is refused naming the key and the limit."""
    from deltamask.config import LIMITS

    limit, _ = LIMITS[key]
    assert getattr(build_config({key: limit}), key) == limit
    with pytest.raises(ConfigError, match=rf"config key '{key}': {limit + 1} is over the limit of {limit:,} "):
        build_config({key: limit + 1})


def test_the_seed_must_fit_in_64_bits() -> None:
    assert build_config({"seed": (1 << 63) - 1}).seed == (1 << 63) - 1
    with pytest.raises(ConfigError, match="'seed': must fit in 64 bits"):
        build_config({"seed": 1 << 63})
