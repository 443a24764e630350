"""python -m common.verify: an intact smoke run passes; each kind of file, damaged in turn (truncated, a flipped
byte, an edited JSON field, deleted), is named; verify never writes. Plus the two holes it closes: an edited
plan.json is refused on reuse and by the report, and --force recovers."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_pipeline import ROOT, run

from common.experiments.verify import verify_run

pytestmark = pytest.mark.slow  # end to end: scripts on the smoke config

ACT = ["--set", "act_quant.budgets=[W4A6]", "--set", "act_quant.plans=[uniform]", "--set",
       "act_quant.range_modes=[single]", "--set", "eval.classifier.train_limit=300"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke_baseline):
    """A smoke run with every kind of file: trained baseline with snapshots, Fisher, two strategy variants, the
    report, a W/A variant (activation file, calibration caches), a sample.py output and a learning curve."""
    tmp = smoke_baseline(tmp_path_factory.mktemp("verify"))  # the shared training (with snapshots) and Fisher
    clf = ["--set", "eval.classifier.train_limit=300"]
    run("simplediffusion.py", tmp, "--set", "train.snapshot_every=1", *clf)
    run("layer_math.py", tmp, *clf)
    run("whole_threshold.py", tmp, *clf)
    subprocess.run([sys.executable, "-m", "common.report", str(tmp / "runs" / "smoke")], check=True, cwd=ROOT,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    run("act_quant.py", tmp, *ACT)
    run("sample.py", tmp, "--n", "4", *clf)
    aq = tmp / "runs" / "smoke" / "act_quant" / "uniform_W4A6_single"
    run("sample.py", tmp, "--n", "4", "--variant-file", str(aq / "quantized.safetensors"), "--out",
        str(tmp / "runs" / "smoke" / "samples" / "aq"), *clf)
    run("learning_curve.py", tmp, "--set", "eval.seeds=[0]", *clf)
    return tmp, tmp / "runs" / "smoke"


def digest_tree(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_intact_run_has_no_problem_and_verify_writes_nothing(smoke_run):
    tmp, run_dir = smoke_run
    before = digest_tree(run_dir)
    p = subprocess.run([sys.executable, "-m", "common.verify", str(run_dir)], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stdout[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    n = sum(1 for f in before if not f.endswith("/.lock"))
    assert last == f"verify: {n} files, 0 problems"
    assert "| fp32/metrics.json |" in p.stdout and "| baseline/checkpoint.pt |" in p.stdout
    assert digest_tree(run_dir) == before


def truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) * 2 // 3] ^= 0x55
    p.write_bytes(bytes(data))


def edit(p, key=None):
    """Change one field of a JSON record, leaving it valid JSON."""
    rec = json.loads(p.read_text())
    key = key or next(k for k, v in rec.items() if isinstance(v, (int, float, str, dict)) and k != "record_sha256")
    v = rec[key]
    rec[key] = (v + 1 if isinstance(v, (int, float)) and not isinstance(v, bool) else
                v + "x" if isinstance(v, str) else {**v, "edited": 1})
    p.write_text(json.dumps(rec, indent=2))


def delete(p):
    p.unlink()


def flip_end(p):
    """The last value's bytes: the file stays readable, only a digest of the data can tell."""
    data = p.read_bytes()
    p.write_bytes(data[:-4] + bytes(b ^ 0x55 for b in data[-4:]))


def change_a_value(p):
    """One tensor value changed in a torch file that still loads (bit rot in the payload; torch.load checks no
    checksum): only the digest of its contents the file carries can tell."""
    import torch

    art = torch.load(p, weights_only=True)
    tensors = [v for v in art.get("diag", {}).values() if isinstance(v, torch.Tensor)] or \
        [v for v in art.values() if isinstance(v, torch.Tensor)]
    tensors[0].view(-1)[0] += 1.0
    torch.save(art, p)


def retype(key, value):
    """Give one field of a sealed JSON record another type, re-sealed (a hand edit through our own writer): only a
    check of the field's type can tell, and a crash would hide the whole table."""
    def damage(p):
        from common.core import storage

        rec = storage.load_json(p)
        rec[key] = value
        rec.pop("record_sha256", None)
        storage.atomic_write_record(rec, p)
    damage.__name__ = f"retype_{key}"
    return damage


CASES = [
    ("layer_math/quantized.safetensors", truncate), ("layer_math/quantized.safetensors", flip),
    ("layer_math/quantized.safetensors", delete),
    ("layer_math/plan.json", lambda p: edit(p, "strategy")), ("layer_math/plan.json", delete),
    ("layer_math/metrics.json", retype("files", None)), ("layer_math/metrics.json", retype("per_seed", [1, 2])),
    ("layer_math/metrics.json", lambda p: edit(p, "clf_fid")), ("layer_math/metrics.json", truncate),
    ("layer_math/samples_seed0.pt", truncate), ("fp32/samples_seed1.pt", flip), ("fp32/samples_seed0.pt", delete),
    ("layer_math/samples.png", flip),
    ("baseline/checkpoint.pt", flip), ("baseline/checkpoint.pt", delete), ("baseline/model.json", edit),
    ("baseline/fisher.pt", truncate), ("baseline/fisher.pt", delete), ("baseline/fisher.pt", change_a_value),
    ("baseline/samples.png", delete),
    ("baseline/snapshots/ema_step0000002.safetensors", flip),
    ("baseline/snapshots/ema_step0000001.safetensors", delete), ("baseline/snapshots/index.json", edit),
    ("act_quant/uniform_W4A6_single/act_quant.safetensors", flip),
    ("act_quant/uniform_W4A6_single/act_quant.safetensors", delete),
    ("act_quant/baseline/act_quant/ranges_single.safetensors", truncate),
    ("act_quant/baseline/act_quant/ranges_single.safetensors", flip_end),
    ("act_quant/baseline/act_quant/fisher_all_weights.pt", truncate),
    ("act_quant/summary.csv", flip), ("summary.md", flip), ("summary.sources.json", edit),
    ("plots/tradeoff.png", delete),
    ("samples/baseline_dequant_seed0/samples.npz", flip), ("samples/baseline_dequant_seed0/sample.json", edit),
    ("learning_curve.json", edit), ("learning_curve.md", truncate),
]


@pytest.mark.parametrize("rel,damage", CASES, ids=[f"{r}-{d.__name__}" for r, d in CASES])
def test_each_damaged_file_is_named(smoke_run, tmp_path, rel, damage):
    _, run_dir = smoke_run
    copy = tmp_path / "smoke"
    shutil.copytree(run_dir, copy)
    damage(copy / rel)
    rows = {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}
    assert rel in rows, sorted(rows)
    assert rows[rel].problem, (rel, rows[rel])
    if damage is delete:
        assert rows[rel].status == "MISSING"


def test_a_source_changed_after_its_summary_makes_the_summary_stale(smoke_run, tmp_path):
    _, run_dir = smoke_run
    copy = tmp_path / "smoke"
    shutil.copytree(run_dir, copy)
    # a variant re-evaluated (here: its metrics.json rewritten validly, seal and all) after the report was written
    from common.core import storage

    m = storage.load_json(copy / "layer_math" / "metrics.json")
    m["wall_seconds"] += 1
    storage.atomic_write_record(m, copy / "layer_math" / "metrics.json")
    rows = {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}
    assert not rows["layer_math/metrics.json"].problem
    assert rows["summary.sources.json"].problem and "stale" in rows["summary.sources.json"].detail


def test_a_variant_paired_against_fp32_samples_since_replaced_is_named(smoke_run, tmp_path):
    """fp32 re-evaluated (e.g. another script's --force on another device) after a variant measured its paired
    MSE: the variant records which fp32 samples it was paired against, so verify names it."""
    _, run_dir = smoke_run
    copy = tmp_path / "smoke"
    shutil.copytree(run_dir, copy)
    from common.core import storage

    m = storage.load_json(copy / "layer_math" / "metrics.json")
    assert m["per_seed"]["0"]["fp32_samples_sha256"] == \
        storage.load_json(copy / "fp32" / "metrics.json")["per_seed"]["0"]["samples_sha256"]
    ref = storage.load_json(copy / "fp32" / "metrics.json")
    ref["per_seed"]["0"]["samples_sha256"] = "0" * 16  # fp32's seed 0 re-sampled (its record rewritten validly)
    storage.atomic_write_record(ref, copy / "fp32" / "metrics.json")
    row = {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}["layer_math/metrics.json"]
    assert row.problem and "measured against other fp32 samples" in row.detail


def test_a_sample_records_its_activation_quantizers(smoke_run, tmp_path):
    _, run_dir = smoke_run
    copy = tmp_path / "smoke"
    shutil.copytree(run_dir, copy)
    from common.core import storage

    path = copy / "samples" / "aq" / "sample.json"
    s = storage.load_json(path)
    assert s["source"]["act_quant"]["path"].endswith("act_quant.safetensors")
    s["source"]["act_quant"]["sha256"] = "0" * 64  # as if the quantizers changed after sampling (seal kept valid)
    storage.atomic_write_record(s, path)
    row = {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}["samples/aq/sample.json"]
    assert row.status == "MISMATCH" and "act_quant.safetensors changed" in row.detail


def test_stray_files_are_unreferenced(smoke_run, tmp_path):
    _, run_dir = smoke_run
    copy = tmp_path / "smoke"
    shutil.copytree(run_dir, copy)
    (copy / "layer_math" / ".quantized.safetensors.99999-abc.tmp").write_bytes(b"half a file")
    (copy / "layer_math" / "quantized.pt").write_bytes(b"an old container")
    (copy / "layer_math" / ".ipynb_checkpoints").mkdir()  # a hidden folder is looked into too
    (copy / "layer_math" / ".ipynb_checkpoints" / "metrics-checkpoint.json").write_text("{}")
    rows = {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}
    assert rows["layer_math/.ipynb_checkpoints/metrics-checkpoint.json"].status == "UNREFERENCED"
    assert rows["layer_math/.quantized.safetensors.99999-abc.tmp"].status == "UNREFERENCED"
    assert rows["layer_math/quantized.pt"].status == "UNREFERENCED"


def test_edited_plan_is_refused_on_reuse_and_by_the_report_and_force_recovers(smoke_run, tmp_path_factory):
    from common.core import storage
    from common.experiments import report

    tmp, run_dir = smoke_run
    other = tmp_path_factory.mktemp("verify_plan")
    shutil.copytree(run_dir, other / "runs" / "smoke")
    shutil.copytree(tmp / "cache", other / "cache")
    vdir = other / "runs" / "smoke" / "layer_math"
    plan = storage.load_json(vdir / "plan.json")
    plan["format"] = "int8"  # one field changed by hand
    (vdir / "plan.json").write_text(json.dumps(plan, indent=2))
    p = run("layer_math.py", other, "--set", "eval.classifier.train_limit=300", check=False)
    assert p.returncode != 0 and str(vdir / "plan.json") in p.stderr and "--force" in p.stderr
    assert p.stderr.count("\n") == 1 and "[layer_math] reusing" not in p.stdout, (p.stdout, p.stderr)
    with pytest.raises(ValueError, match=r"layer_math not tabulated.*layer_math.py.*--force"):
        report.load_results(str(other / "runs" / "smoke"))
    run("layer_math.py", other, "--set", "eval.classifier.train_limit=300", "--force")
    assert storage.load_json(vdir / "plan.json")["format"] == "fp16"
    assert not [f for f in verify_run(str(vdir.parent)) if f.problem and "layer_math" in f.path]


def test_variants_and_runs_share_one_file_check_and_one_seal_check(tmp_path):
    """``verify`` checks a recorded file and a sealed record with ``integrity.file_check`` / ``integrity.sealed``
    (it had its own ``check_bound`` / ``sealed``): the same status as the code it replaced (copied here) for an
    intact, a changed and a missing file, and for a sealed, an edited and an unsealed record."""
    from common.core import storage
    from common.evaluation import integrity
    from common.experiments import verify

    assert verify.file_check is integrity.file_check and verify.sealed is integrity.sealed

    def old_check_bound(path, sha, recorded_in):
        if not os.path.exists(path):
            return integrity.MISSING
        return integrity.OK if storage.sha256_file(path) == sha else integrity.MISMATCH

    def old_sealed(record):
        return integrity.OK if storage.seal_ok(record) else integrity.MISMATCH

    f = tmp_path / "plan.json"
    f.write_bytes(b"{}")
    sha = hashlib.sha256(b"{}").hexdigest()
    rec = str(tmp_path / "metrics.json")
    for path, want in ((f, sha), (f, "0" * 64), (tmp_path / "gone.json", sha)):
        row = integrity.file_check(str(path), want, rec)
        assert row.status == old_check_bound(str(path), want, rec) and row.depends == [rec]
    storage.atomic_write_record({"a": 1}, rec)
    good = json.load(open(rec))
    for record in (good, {**good, "a": 2}, {"a": 1}):
        row = integrity.sealed(integrity.Finding(rec), record)
        assert row.status == old_sealed(record)
    assert integrity.sealed(integrity.Finding(rec, [], integrity.MISSING, "x"), {"a": 1}).detail == "x"  # first stays


def test_a_folder_with_nothing_of_a_run_is_an_error_not_a_clean_pass(tmp_path):
    from common.experiments.verify import main

    with pytest.raises(SystemExit, match=r"no files of a run folder"):
        main([str(tmp_path)])
