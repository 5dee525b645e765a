"""Config: YAML + key=value overrides, typed and validated once; errors name the key (and file) at fault."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from rlmt.config import Config, ConfigError, describe, load_config, to_dict, with_method_defaults


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ reading values


def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == with_method_defaults(Config())  # unset pg keys: the default algorithm's convention
    assert cfg.algorithm == "sft"
    assert cfg.optim.lr == 1e-5


def test_yaml_file_sets_nested_sections(tmp_path):
    path = write(tmp_path, """
algorithm: rejection_sampling
model:
  name: tiny-random
  lora:
    r: 4
    target_modules: [q_proj]
optim:
  lr: 2.0e-4
  batch_size: 4
rollout:
  stop: ["\\n\\n"]
reward:
  source: regex
  args: {pattern: "\\\\d+"}
data:
  system_prompt: null
""")
    cfg = load_config(path)
    assert cfg.algorithm == "rejection_sampling"
    assert cfg.model.name == "tiny-random"
    assert cfg.model.lora.r == 4
    assert cfg.model.lora.target_modules == ["q_proj"]
    assert cfg.model.lora.alpha == 16.0  # untouched siblings keep their defaults
    assert cfg.optim.lr == 2e-4
    assert cfg.optim.batch_size == 4
    assert cfg.optim.grad_accum == 1
    assert cfg.rollout.stop == ["\n\n"]
    assert cfg.reward.args == {"pattern": "\\d+"}
    assert cfg.data.system_prompt is None


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == with_method_defaults(Config())


def test_overrides_are_dotted_and_yaml_typed():
    cfg = load_config(overrides=[
        "optim.batch_size=16", "run.progress=false", "rollout.temperature=0", "rollout.stop=[END, '###']",
        "reward.args={pattern: x}", "model.lora.r=8", "data.system_prompt=Be brief.",
    ])
    assert cfg.optim.batch_size == 16 and isinstance(cfg.optim.batch_size, int)
    assert cfg.run.progress is False
    assert cfg.rollout.temperature == 0.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.rollout.stop == ["END", "###"]
    assert cfg.reward.args == {"pattern": "x"}
    assert cfg.model.lora.r == 8
    assert cfg.data.system_prompt == "Be brief."


@pytest.mark.parametrize("text, expected", [("3e-5", 3e-5), ("1e-3", 1e-3), ("2.5e-4", 2.5e-4), ("1", 1.0)])
def test_scientific_notation_becomes_float(text, expected):
    # YAML 1.1 reads "3e-5" (no dot) as a string; a float field must still accept it
    cfg = load_config(overrides=[f"optim.lr={text}"])
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr == pytest.approx(expected)


def test_scientific_notation_in_yaml_file(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 3e-5\n  eps: 1e-6\n"))
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.optim.eps == pytest.approx(1e-6)


def test_overrides_win_over_file_and_keep_file_siblings(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n  batch_size: 4\n")
    cfg = load_config(path, ["optim.lr=5e-4"])
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.optim.batch_size == 4


def test_later_override_wins():
    assert load_config(overrides=["optim.batch_size=2", "optim.batch_size=3"]).optim.batch_size == 3


def test_base_is_applied_under_file_and_overrides(tmp_path):
    base = {"optim": {"lr": 1e-3, "batch_size": 2}, "run": {"seed": 7}}
    path = write(tmp_path, "optim:\n  batch_size: 5\n")
    cfg = load_config(path, ["run.seed=9"], base=base)
    assert cfg.optim.lr == pytest.approx(1e-3)  # from base
    assert cfg.optim.batch_size == 5  # file over base
    assert cfg.run.seed == 9  # override over base
    assert base == {"optim": {"lr": 1e-3, "batch_size": 2}, "run": {"seed": 7}}  # base not mutated


def test_override_value_with_equals_sign_keeps_the_rest():
    assert load_config(overrides=["data.system_prompt=a=b"]).data.system_prompt == "a=b"


def test_to_dict_round_trips_through_load_config():
    cfg = load_config(overrides=["optim.lr=3e-5", "model.lora.r=2", "rollout.stop=[x]"])
    assert load_config(base=to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize("override, key, suggestion", [
    ("lr=1", "lr", "optim.lr"),                          # a leaf at the top level
    ("optim.lrr=1", "optim.lrr", "optim.lr"),            # a typo inside a section
    ("optim.max_step=2", "optim.max_step", "optim.max_steps"),
    ("model.lora.rr=2", "model.lora.rr", "model.lora.r"),  # two levels deep
    ("modle.name=x", "modle", "model"),                  # a misspelt section
    ("run.lr=1", "run.lr", "optim.lr"),                  # a leaf in the wrong section
    ("rollout.seed=1", "rollout.seed", "run.seed"),
    ("data.batch_size=2", "data.batch_size", "optim.batch_size"),
    ("max_steps=3", "max_steps", "optim.max_steps"),
])
def test_unknown_key_names_key_and_closest_valid_one(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert f"unknown config key {key!r}" in msg
    assert f"did you mean {suggestion!r}" in msg


def test_unknown_key_without_any_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["zzzzqqqq=1"])
    assert "'zzzzqqqq'" in str(e.value)
    assert "did you mean" not in str(e.value)


def test_unknown_nested_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-4\n  batchsize: 4\n", name="my-run.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "'optim.batchsize'" in msg
    assert "did you mean 'optim.batch_size'" in msg


def test_misplaced_leaf_at_top_of_file(tmp_path):
    path = write(tmp_path, "lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"optim: expected a mapping"):
        load_config(overrides=["optim=3"])


def test_leaf_given_a_mapping_is_an_error():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float"):
        load_config(overrides=["optim.lr.x=1"])


# ------------------------------------------------------------------------------------------ types


@pytest.mark.parametrize("override, key", [
    ("optim.batch_size=abc", "optim.batch_size"),   # int given a string
    ("optim.batch_size=2.5", "optim.batch_size"),   # int given a float
    ("optim.batch_size=true", "optim.batch_size"),  # bool is not an int
    ("optim.lr=fast", "optim.lr"),                  # float given a non-number string
    ("optim.lr=true", "optim.lr"),                  # bool is not a float
    ("run.progress=1", "run.progress"),             # int is not a bool
    ("run.progress=maybe", "run.progress"),
    ("rollout.stop=END", "rollout.stop"),           # list given a string
    ("reward.args=[1]", "reward.args"),             # dict given a list
    ("model.name=[a]", "model.name"),               # str given a list
])
def test_wrong_type_names_the_key_and_expected_type(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(f"{key}: expected ")


def test_yaml_yes_and_no_are_booleans():
    # YAML 1.1 (PyYAML) reads yes/no/on/off as booleans, so a bool field accepts them
    assert load_config(overrides=["run.progress=no"]).run.progress is False
    assert load_config(overrides=["run.tensorboard=yes"]).run.tensorboard is True
    # ... and an int field rejects them, rather than taking True as 1
    with pytest.raises(ConfigError, match=r"optim\.batch_size: expected int, got True"):
        load_config(overrides=["optim.batch_size=yes"])


def test_int_is_accepted_for_a_float_field():
    cfg = load_config(overrides=["optim.max_grad_norm=2"])
    assert cfg.optim.max_grad_norm == 2.0 and isinstance(cfg.optim.max_grad_norm, float)


def test_optional_field_takes_none_or_its_type():
    assert load_config(overrides=["rejection.threshold=null"]).rejection.threshold is None
    assert load_config(overrides=["rejection.threshold=0.5"]).rejection.threshold == 0.5
    with pytest.raises(ConfigError, match=r"rejection\.threshold: expected float"):
        load_config(overrides=["rejection.threshold=high"])


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  batch_size: eight\n", name="bad-types.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: optim.batch_size: expected int")


@pytest.mark.parametrize("override, key, suggestion", [
    ("optim.schedule=cosin", "optim.schedule", "cosine"),
    ("algorithm=sfft", "algorithm", "sft"),
    ("model.dtype=bfloat", "model.dtype", "bfloat16"),
    ("data.on_invalid=skp", "data.on_invalid", "skip"),
])
def test_literal_choice_lists_choices_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert msg.startswith(f"{key}: ")
    assert "is not one of" in msg
    assert f"did you mean {suggestion!r}" in msg


def test_literal_choice_accepts_every_listed_value():
    for schedule in ("constant", "linear", "cosine"):
        assert load_config(overrides=[f"optim.schedule={schedule}"]).optim.schedule == schedule


# ------------------------------------------------------------------------------------------ cross-field checks


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-5"], "optim.lr"),
    (["optim.batch_size=0"], "optim.batch_size"),
    (["optim.grad_accum=0"], "optim.grad_accum"),
    (["optim.max_steps=-1"], "optim.max_steps"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["rollout.num_samples=0"], "rollout.num_samples"),
    (["rollout.temperature=-0.5"], "rollout.temperature"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
    (["eval.num_samples=0"], "eval.num_samples"),
    (["data.max_prompt_tokens=0"], "data.max_prompt_tokens"),
    (["rejection.keep_top_k=-1"], "rejection.keep_top_k"),
    (["rejection.keep_top_k=0"], "rejection.keep_top_k"),  # keep-all needs a threshold
    (["run.resume=/no/such/checkpoint"], "run.resume"),
    (["model.lora.r=-1"], "model.lora.r"),
])
def test_cross_field_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert str(e.value).startswith(f"{key}: ")


def test_keep_all_with_threshold_is_valid():
    cfg = load_config(overrides=["rejection.keep_top_k=0", "rejection.threshold=1.0"])
    assert cfg.rejection.keep_top_k == 0 and cfg.rejection.threshold == 1.0


def test_resume_accepts_an_existing_path_and_yaml_booleans(tmp_path):
    assert load_config(overrides=[f"run.resume={tmp_path}"]).run.resume == str(tmp_path)
    assert load_config(overrides=["run.resume=true"]).run.resume == "true"  # YAML bool -> 'true'
    assert load_config(overrides=["run.resume=false"]).run.resume == "false"


def test_cross_field_error_from_file_names_the_file(tmp_path):
    path = write(tmp_path, "rollout:\n  top_p: 0\n", name="sampling.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: rollout.top_p: ")


# ------------------------------------------------------------------------------------------ bad files and syntax


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "optim: [unclosed\n", name="broken.yaml")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping") as e:
        load_config(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim.lr=[unclosed"])
def test_malformed_override(text):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[text])
    assert repr(text) in str(e.value)


# ------------------------------------------------------------------------------------------ frozen + documented


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.algorithm = "rejection_sampling"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.lora.r = 4  # type: ignore[misc]


def test_list_defaults_are_not_shared_between_configs():
    a, b = Config(), Config()
    assert a.optim.betas == b.optim.betas
    assert a.optim.betas is not b.optim.betas
    assert a.model.lora.target_modules is not b.model.lora.target_modules


def _field_keys(cfg, prefix=""):
    """Dotted names of every field, sections included, walking the live config objects."""
    keys = []
    for f in dataclasses.fields(cfg):
        keys.append(prefix + f.name)
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += _field_keys(value, prefix + f.name + ".")
    return keys


def test_describe_documents_every_field():
    rows = describe()
    keys = [key for key, _, _ in rows]
    assert keys == _field_keys(Config())  # every field and section, each once, in order
    assert len(keys) == len(set(keys))
    undocumented = [key for key, _, text in rows if not text.strip()]
    assert undocumented == []


def test_describe_defaults_match_the_dataclass_defaults():
    cfg = Config()
    for key, default, _ in describe():
        value = _get(cfg, key)
        if dataclasses.is_dataclass(value):
            assert default == ""  # a section row
        else:
            assert default == repr(value), key


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_described_key_is_settable_by_override():
    # each leaf key that --help-config prints is one load_config accepts, and its value arrives intact
    cfg = with_method_defaults(Config())
    for key, default, _ in describe():
        if default == "":
            continue
        value = _get(cfg, key)
        reloaded = load_config(overrides=[f"{key}={_yaml_scalar(value)}"])
        assert _get(reloaded, key) == value, key


def test_unset_policy_gradient_keys_take_the_method_convention_and_set_ones_win():
    ppo = load_config(None, ["algorithm=ppo"]).pg
    assert (ppo.kl_estimator, ppo.kl_in_reward, ppo.aggregation) == ("k1", True, "token_mean")
    grpo = load_config(None, ["algorithm=grpo"]).pg
    assert (grpo.kl_estimator, grpo.kl_in_reward, grpo.aggregation) == ("k3", False, "token_mean")
    assert load_config(None, ["algorithm=gspo"]).pg.aggregation == "seq_mean"
    mine = load_config(None, ["algorithm=ppo", "pg.kl_estimator=k3", "pg.kl_in_reward=false"]).pg
    assert (mine.kl_estimator, mine.kl_in_reward) == ("k3", False)


def test_critic_lr_must_be_positive():
    with pytest.raises(ConfigError, match="ppo.critic_lr"):
        load_config(None, ["algorithm=ppo", "ppo.critic_lr=0"])


def test_grape_critic_is_typed_and_a_key_of_another_backend_is_rejected():
    from rlmt.config import critic_spec

    base = ["algorithm=grape", "grape.rubric=r.yaml"]
    cfg = load_config(None, base + ["grape.critic={backend: local, model: tiny-random, max_batch: 4}"])
    assert critic_spec(cfg) == {"backend": "local", "model": "tiny-random", "max_batch": 4}
    http = load_config(None, base + ["grape.critic={backend: http, model: m, base_url: 'http://127.0.0.1:9/v1'}",
                                     "grape.critic.retries=1"])
    assert critic_spec(http) == {"backend": "http", "model": "m", "base_url": "http://127.0.0.1:9/v1", "retries": 1}
    with pytest.raises(ConfigError, match=r"grape\.critic\.base_url: applies to backend http"):
        load_config(None, base + ["grape.critic.base_url=http://x"])
    with pytest.raises(ConfigError, match=r"grape\.critic\.batch_size: applies to .* logprobs"):
        load_config(None, base + ["grape.critic.batch_size=4"])  # json mode (the default)
    with pytest.raises(ConfigError, match=r"grape\.critic\.base_url: an http critic needs"):
        load_config(None, base + ["grape.critic.backend=http"])
    with pytest.raises(ConfigError, match=r"unknown config key 'grape\.critic\.modle'"):
        load_config(None, base + ["grape.critic.modle=x"])


def test_reward_args_are_checked_against_the_source_before_anything_loads():
    from rlmt.rewards import check_reward_source

    check_reward_source(load_config(None, ["reward.source=regex", "reward.args={pattern: x}"]))
    with pytest.raises(ConfigError, match=r"reward\.args\.patern: not an argument of reward source 'regex'; "
                                          r"did you mean 'pattern'"):
        check_reward_source(load_config(None, ["reward.source=regex", "reward.args={patern: x}"]))
    with pytest.raises(ConfigError, match=r"reward\.source: unknown reward source 'regexp'"):
        check_reward_source(load_config(None, ["reward.source=regexp"]))


def test_unset_keys_that_stand_for_another_value_are_recorded_as_that_value():
    """config.yaml records what is in effect: an unset upper clip is the lower one, PPO's unset critic LR is
    optim.lr; a set value wins; a key with no effect (no critic) stays unset."""
    grpo = load_config(None, ["algorithm=grpo", "pg.clip_eps=0.3"])
    assert grpo.pg.clip_eps_high == 0.3
    assert load_config(None, ["algorithm=grpo", "pg.clip_eps_high=0.28"]).pg.clip_eps_high == 0.28
    assert load_config(None, ["algorithm=ppo", "optim.lr=2e-4"]).ppo.critic_lr == 2e-4
    assert load_config(None, ["algorithm=ppo", "ppo.critic_lr=0.5"]).ppo.critic_lr == 0.5
    assert load_config(None, ["algorithm=grpo"]).ppo.critic_lr is None
    cfg = load_config(None, ["algorithm=ppo"])
    assert with_method_defaults(cfg) == cfg


def test_allow_config_change_is_a_typed_documented_key():
    assert load_config(None, ["run.allow_config_change=true"]).run.allow_config_change is True
    with pytest.raises(ConfigError, match="run.allow_config_change"):
        load_config(None, ["run.allow_config_change=maybe"])
    assert any(key == "run.allow_config_change" and doc for key, _, doc in describe())


def test_a_bad_value_from_the_command_line_names_the_override_not_the_file(tmp_path):
    from rlmt.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("algorithm: grpo\noptim: {lr: 1.0e-5}\n")
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=abc': optim.lr: expected float, got 'abc'$"):
        load_config(path, ["optim.lr=abc"])
    path.write_text("algorithm: grpo\noptim: {lr: abc}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: optim.lr: expected float"):  # from the file: the file
        load_config(path, ["optim.batch_size=4"])


def test_a_number_in_an_override_indexes_a_list_of_stages(tmp_path):
    from rlmt.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text("algorithm: pipeline\nstages:\n  - {name: a, algorithm: sft, optim: {max_steps: 20}}\n"
                    "  - {name: b, algorithm: dpo}\n")
    cfg = load_config(path, ["stages.0.optim.max_steps=2", "stages.1.dpo.beta=0.5"])
    assert cfg.stages[0]["optim"]["max_steps"] == 2 and cfg.stages[1]["dpo"] == {"beta": 0.5}
    with pytest.raises(ConfigError, match="stages is a list of 2 entries; '2' is not an index"):
        load_config(path, ["stages.2.optim.max_steps=2"])
