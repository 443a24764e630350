"""common.evaluation.classifier: the MNIST classifier of the classifier metrics, trained and cached, or released
(SHA-256 verified, the same on every machine); reference features keyed on the classifier's SHA-256."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from common.core import machine
from common.core.config import ClassifierConfig, ConfigError, load_config
from common.core.storage import sha256_file
from common.evaluation import classifier, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_classifier_score_range():
    p = torch.eye(10).repeat(5, 1)
    assert classifier.classifier_score(p.double()) == pytest.approx(10.0, rel=1e-6)
    assert classifier.classifier_score(torch.full((20, 10), 0.1, dtype=torch.float64)) == pytest.approx(1.0)


def test_released_classifier_scores_real_test_digits_high_and_flat(data_root):
    """The released instrument on 1000 held-out test digits: high classifier-IS, a flat class histogram."""
    from common.diffusion.data import load_mnist, to_model_space, to_uint8

    clf_cfg = load_config(os.path.join(ROOT, "configs", "default.yaml")).eval.classifier
    clf_cfg.weights = os.path.join(ROOT, clf_cfg.weights)
    model, _ = classifier.load_released(clf_cfg, 32)
    x, _ = load_mnist(data_root, "test")
    feats, probs = classifier.classifier_outputs(model, to_uint8(to_model_space(x[:1000], 32)))
    assert feats.shape == (1000, 128)
    assert classifier.classifier_score(probs) > 9.0
    hist = torch.bincount(probs.argmax(1), minlength=10).double() / 1000
    assert hist.min() > 0.05 and hist.max() < 0.16


def test_classifier_trained_here_is_cached_not_retrained(tiny_cfg):
    clf_cfg = tiny_cfg.eval.classifier
    clf_cfg.weights, clf_cfg.train_limit, clf_cfg.epochs, clf_cfg.test_limit = None, 2000, 1, 500
    model, info = classifier.load_or_train_classifier(tiny_cfg.run.cache_dir, tiny_cfg.data, clf_cfg, progress=False)
    assert info["n_test"] == 500 and info["n_train"] == 2000 and info["test_accuracy"] > 0.3  # chance: 0.1
    assert info["source"] == "trained here" and info["sha256"] == sha256_file(info["path"])
    again, info2 = classifier.load_or_train_classifier(tiny_cfg.run.cache_dir, tiny_cfg.data, clf_cfg, progress=False)
    assert info2 == info  # cached, not retrained
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(classifier.classifier_outputs(model, x)[1], classifier.classifier_outputs(again, x)[1])
    # a foreign file under the cache's name is retrained over (not a KeyError)
    torch.save({"weights": torch.zeros(2)}, info["path"])
    _, info3 = classifier.load_or_train_classifier(tiny_cfg.run.cache_dir, tiny_cfg.data, clf_cfg, progress=False)
    assert info3["test_accuracy"] == info["test_accuracy"] and torch.load(info["path"], weights_only=True)["info"]


def test_a_classifier_another_process_is_training_is_waited_for_not_trained_twice(tiny_cfg, tmp_path, monkeypatch):
    """Ranks of one torchrun share run.cache_dir: while one trains the local classifier (holding the cache's lock),
    another waits for it and reuses its file instead of training its own copy."""
    import shutil

    clf_cfg = tiny_cfg.eval.classifier
    clf_cfg.weights, clf_cfg.train_limit, clf_cfg.epochs, clf_cfg.test_limit = None, 600, 1, 200
    _, trained = classifier.load_or_train_classifier(str(tmp_path / "first"), tiny_cfg.data, clf_cfg, progress=False)
    shared = tmp_path / "shared"
    target = shared / os.path.basename(trained["path"])
    other = subprocess.Popen(  # the rank that trains: holds the lock, then writes the file
        [sys.executable, "-c", f"import sys, time, shutil; sys.path.insert(0, {ROOT!r}); "
         f"from common.core.lock import hold\nwith hold({str(shared)!r}):\n    print('held', flush=True); "
         f"time.sleep(1.0); shutil.copyfile({trained['path']!r}, {str(target)!r})"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("trained a second copy"))
        _, info = classifier.load_or_train_classifier(str(shared), tiny_cfg.data, clf_cfg, progress=False)
    finally:
        other.wait(timeout=60)
    assert info["sha256"] == trained["sha256"] and info["path"] == str(target)
    shutil.rmtree(shared)


# ----------------------------------------------------------------------------- released
@pytest.fixture(scope="module")
def released(tmp_path_factory, data_root):
    """A classifier released from 600 real images, one epoch: (data config, recipe with weights + sha256, record)."""
    out = str(tmp_path_factory.mktemp("clf") / "clf.safetensors")
    data = SimpleNamespace(root=data_root, download=False, image_size=32)
    recipe = ClassifierConfig(epochs=1, train_limit=600)
    sha, prov, record = classifier.release_classifier(data, recipe, out, classifier.release_command("c.yaml", out),
                                                      progress=False)
    assert prov == out[:-len(".safetensors")] + ".json" and json.load(open(prov)) == record
    return data, ClassifierConfig(epochs=1, train_limit=600, weights=out, sha256=sha), record


@pytest.mark.slow  # ``released`` trains a classifier on real MNIST, scored on all 10,000 test digits
def test_release_records_hash_accuracy_machine_and_the_command(released):
    _, clf_cfg, record = released
    assert record["sha256"] == sha256_file(clf_cfg.weights) == clf_cfg.sha256
    assert record["n_train"] == 600 and record["n_test"] == 10000 and 0.1 < record["test_accuracy"] <= 1
    assert record["trained_on"] == machine.capability() and record["image_size"] == 32
    assert record["retrain_command"] == f"python -m common.release_classifier --config c.yaml {clf_cfg.weights}"
    assert record["recipe"]["epochs"] == 1 and record["recipe"]["train_limit"] == 600


@pytest.mark.slow  # uses ``released``
def test_released_classifier_loads_verified_without_training_data(released, tmp_path):
    """The released file is all it needs: no MNIST training images are read, nothing is trained or cached."""
    data, clf_cfg, record = released
    nowhere = SimpleNamespace(root=str(tmp_path / "no_mnist"), download=False, image_size=32)
    model, info = classifier.load_or_train_classifier(str(tmp_path / "cache"), nowhere, clf_cfg, progress=False)
    assert info["source"] == "released" and info["sha256"] == clf_cfg.sha256
    assert info["test_accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)
    assert not (tmp_path / "cache").exists() and not model.training
    again, _ = classifier.load_released(clf_cfg, 32)
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(classifier.classifier_outputs(model, x)[1], classifier.classifier_outputs(again, x)[1])


@pytest.mark.slow  # uses ``released``
def test_a_wrong_hash_missing_or_foreign_file_is_refused_naming_the_file(released, tmp_path):
    from safetensors.torch import save_file

    _, clf_cfg, _ = released
    wrong = ClassifierConfig(weights=clf_cfg.weights, sha256="0" * 64)
    with pytest.raises(classifier.ClassifierError) as e:
        classifier.load_released(wrong, 32, "configs/x.yaml")
    msg = str(e.value)
    assert clf_cfg.weights in msg and "expects 0000000000000000" in msg and "configs/x.yaml" in msg
    assert "python -m common.release_classifier --config configs/x.yaml" in msg and "weights=null" in msg
    assert "\n" not in msg
    gone = ClassifierConfig(weights=str(tmp_path / "gone.safetensors"), sha256="0" * 64)
    with pytest.raises(classifier.ClassifierError, match=r"gone.safetensors not found.*release_classifier"):
        classifier.load_released(gone, 32)
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(classifier.ClassifierError, match=r"foreign.safetensors is not a LAQFI MNIST classifier"):
        classifier.load_released(ClassifierConfig(weights=foreign, sha256=sha256_file(foreign)), 32)
    with pytest.raises(classifier.ClassifierError, match=r"classifies 32x32 images, but data.image_size is 28"):
        classifier.load_released(clf_cfg, 28)


def test_config_needs_a_sha256_with_released_classifier_weights():
    with pytest.raises(ConfigError, match="eval.classifier.sha256"):
        load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["eval.classifier.weights=x.safetensors"])


def test_reference_features_are_keyed_on_the_classifier_hash(released, tiny_cfg, monkeypatch):
    data, clf_cfg, _ = released
    model, info = classifier.load_released(clf_cfg, 32)
    monkeypatch.setattr(evaluate, "_CACHE", {})
    ref = evaluate.classifier_reference(tiny_cfg, model, info)
    files = os.listdir(tiny_cfg.run.cache_dir)
    assert [f for f in files if f.startswith("ref_classifier_")] == [
        f"ref_classifier_clf{clf_cfg.sha256[:16]}_n{tiny_cfg.eval.ref_n_images}_s32_d"
        f"{evaluate._CACHE[('ref_images', tiny_cfg.data.root, tiny_cfg.eval.ref_n_images, 32)][1]}.pt"]
    other = classifier.MNISTClassifier().eval()  # another classifier: another hash, its own features
    other_ref = evaluate.classifier_reference(tiny_cfg, other, {**info, "sha256": "f" * 64})
    assert len([f for f in os.listdir(tiny_cfg.run.cache_dir) if f.startswith("ref_classifier_")]) == 2
    assert not torch.allclose(torch.as_tensor(ref["features"]), torch.as_tensor(other_ref["features"]))
    monkeypatch.setattr(evaluate, "_CACHE", {})  # a new process: read from disk, nothing recomputed
    monkeypatch.setattr(classifier, "classifier_outputs", lambda *a: pytest.fail("recomputed"))
    again = evaluate.classifier_reference(tiny_cfg, model, info)
    assert (again["features"] == ref["features"]).all()


def test_eval_fingerprint_names_a_released_classifier_by_its_hash_alone(tiny_cfg):
    from common.diffusion.checkpoint import training_inputs

    trained = evaluate.eval_inputs(tiny_cfg)["eval"]["classifier"]
    assert "weights" not in trained and "sha256" not in trained and trained["epochs"] == 1  # as before the keys
    before = training_inputs(tiny_cfg)
    tiny_cfg.eval.classifier.weights, tiny_cfg.eval.classifier.sha256 = "a/clf.safetensors", "a" * 64
    assert evaluate.eval_inputs(tiny_cfg)["eval"]["classifier"] == {"sha256": "a" * 64}
    fp = evaluate.eval_fingerprint(tiny_cfg)
    tiny_cfg.eval.classifier.weights, tiny_cfg.eval.classifier.epochs = "b/moved.safetensors", 9
    assert evaluate.eval_fingerprint(tiny_cfg) == fp  # the file's identity decides, not its path or recipe
    tiny_cfg.eval.classifier.sha256 = "b" * 64
    assert evaluate.eval_fingerprint(tiny_cfg) != fp
    assert training_inputs(tiny_cfg) == before  # evaluation keys never touch the training fingerprint


def test_metrics_json_records_machine_and_classifier(released, tiny_cfg, tiny_model_fisher):
    _, clf_cfg, _ = released
    tiny_cfg.eval.classifier = clf_cfg
    _, model, _ = tiny_model_fisher
    size = {"size_bytes": 10, "quantized_fraction": 0.0, "fp32_bytes": 10}
    r = evaluate.evaluate_variant(tiny_cfg, "fp32", model, size, "cpu", "weights-id", progress=False)
    saved = json.load(open(os.path.join(evaluate.variant_dir(tiny_cfg, "fp32"), "metrics.json")))
    assert saved["machine"] == r["machine"] == machine.capability()
    assert saved["classifier"] == {"source": "released", "path": clf_cfg.weights, "sha256": clf_cfg.sha256,
                                   "test_accuracy": saved["classifier_test_accuracy"]}
    assert "machine" not in json.dumps(evaluate.eval_inputs(tiny_cfg))


@pytest.mark.slow  # uses ``released``
def test_a_variant_with_another_variants_weights_scores_its_samples_instead_of_sampling(
        released, tiny_cfg, tiny_model_fisher, monkeypatch):
    """Two plan rules that allocate the same formats store the same tensors: the second variant scores the first's
    samples (verified by their digests) and gets the numbers sampling would have given; a damaged, edited or
    other-keyed twin lends nothing, and --force samples."""
    _, clf_cfg, _ = released
    tiny_cfg.eval.classifier = clf_cfg
    _, model, _ = tiny_model_fisher
    size = {"size_bytes": 10, "quantized_fraction": 0.0, "fp32_bytes": 10}
    sampled = []
    real = evaluate.sample_across_ranks
    monkeypatch.setattr(evaluate, "sample_across_ranks", lambda *a, **k: sampled.append(a[4]) or real(*a, **k))

    def run(variant, key, force=False):
        sampled.clear()
        r = evaluate.evaluate_variant(tiny_cfg, variant, model, size, "cpu", "w", progress=False, samples_key=key,
                                      force=force)
        return r, list(sampled)

    evaluate.evaluate_variant(tiny_cfg, "fp32", model, size, "cpu", "w", progress=False)
    a, seeds = run("a", "k")
    assert seeds == list(tiny_cfg.eval.seeds) and "samples_from" not in a
    b, seeds = run("b", "k")
    assert seeds == [] and b["samples_from"] == "a" and b["samples_key"] == "k"
    assert b["samples_machine"] == a["machine"]
    numbers = ("clf_fid", "clf_is", "clf_kid", "paired_mse_vs_fp32", "paired_mse_median", "fid")
    assert {k: b[k] for k in numbers} == {k: a[k] for k in numbers} and b["per_seed"] == a["per_seed"]
    folder = evaluate.variant_dir
    assert open(os.path.join(folder(tiny_cfg, "b"), "samples.png"), "rb").read() == \
        open(os.path.join(folder(tiny_cfg, "a"), "samples.png"), "rb").read()
    _, seeds = run("c", "other key")
    assert seeds == list(tiny_cfg.eval.seeds)
    assert run("b", "k", force=True)[1] == list(tiny_cfg.eval.seeds)  # --force recomputes, never borrows
    c_path = os.path.join(evaluate.variant_dir(tiny_cfg, "c"), "metrics.json")
    edited = json.load(open(c_path))
    edited["samples_key"] = "k2"  # by hand: the seal no longer holds
    json.dump(edited, open(c_path, "w"))
    assert run("e", "k2")[1] == list(tiny_cfg.eval.seeds)
    for v in ("a", "b"):  # every twin of key "k" damaged: d samples, and matches what a's twins reported
        p = os.path.join(folder(tiny_cfg, v), f"samples_seed{tiny_cfg.eval.seeds[-1]}.pt")
        torch.save(torch.load(p, weights_only=True) * 0.5, p)
    d, seeds = run("d", "k")
    assert seeds == list(tiny_cfg.eval.seeds) and "samples_from" not in d
    assert {k: d[k] for k in numbers} == {k: a[k] for k in numbers}


def test_the_default_config_uses_the_released_classifier():
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"))
    clf = cfg.eval.classifier
    path = os.path.join(ROOT, clf.weights)
    assert clf.weights == "checkpoints/mnist_classifier.safetensors" and sha256_file(path) == clf.sha256
    assert int(classifier.read_metadata(path)["image_size"]) == cfg.data.image_size
    prov = json.load(open(os.path.splitext(path)[0] + ".json"))
    assert prov["sha256"] == clf.sha256 and prov["test_accuracy"] >= 0.99
    assert prov["retrain_command"].startswith("python -m common.release_classifier --config configs/default.yaml")
    assert load_config(os.path.join(ROOT, "configs", "dit.yaml")).eval.classifier == clf  # extends default.yaml


def test_release_classifier_help():
    p = subprocess.run([sys.executable, "-m", "common.release_classifier", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 0 and "eval.classifier" in p.stdout
