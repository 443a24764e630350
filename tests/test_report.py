"""common.experiments.report verdicts on hand-made results: the decision rules, not the plumbing."""
import json
import os

import numpy as np
import pytest

from common.experiments import report


def variant(values, size_mb, fmt=None, key="clf_fid"):
    r = {"per_seed": {str(s): {key: v, "fid": None} for s, v in enumerate(values)}, "size_mb": size_mb,
         "seeds": list(range(len(values))), key: float(np.mean(values)), "fid": None}
    if fmt:
        r["format"] = fmt
    return r


@pytest.mark.parametrize("impr, verdict", [
    ([7.0, 6.5, 7.6], "supported"),
    ([1.0, -1.2, 0.4], "within noise"),
    ([-5.0, -5.5, -4.8], "not supported (worse than uniform)"),
    ([30.0, 31.0, 29.5], "not supported (improves, but not by ~7%)"),
    ([1.0, 1.1, 0.9], "not supported (improves, but not by ~7%)"),
    ([7.0, 8.0], "undecided (2 seed(s): too few for a spread)"),
])
def test_improvement_verdict(impr, verdict):
    assert report._improvement_verdict(np.array(impr))[0] == verdict


def test_claimed_improvement_is_the_posters():
    assert report.POSTER_RATIO_IMPROVEMENT_PCT == pytest.approx(7.096, abs=1e-3)


def test_adaptive_variant_is_compared_with_uniform_of_its_own_format():
    results = {
        "fp32": variant([10.0, 10.1, 9.9], 8.0),
        "uniform_fp16": variant([10.0, 10.1, 9.9], 4.0),   # fp16 costs nothing
        "uniform_int4": variant([30.0, 31.0, 29.0], 1.0),  # int4 costs a lot
        "layer_math": variant([15.6, 15.9, 15.7], 6.0, fmt="int4"),
    }
    (claim, verdict, evidence), = [v for v in report.verdicts(results, None) if "layer_math" in v[0]]
    # at 6 MB the fp32-uniform_int4 line is at 15.7 -> within noise; the fp16 line (10) would call it worse

    assert verdict == "within noise", evidence
    results["layer_math"]["format"] = "fp16"
    (_, verdict, _), = [v for v in report.verdicts(results, None) if "layer_math" in v[0]]
    assert verdict == "not supported (opposite)"


def test_equal_size_comparisons_are_one_family_corrected_by_holm():
    """Four rules, each 8 standard errors below the line on 3 seeds (p ~ 0.015): each would be *supported* alone at
    5%, but not as one of a family of four (Holm: the smallest p must be below 0.05 / 4); one at 40 standard errors
    (p ~ 6e-4) is supported even so."""
    line = [10.0, 10.1, 9.9]
    results = {"fp32": variant(line, 8.0), "uniform_fp16": variant(line, 4.0)}
    for rule in ("whole_threshold", "layer_group", "layer_ratio_p0.4", "layer_math"):
        results[rule] = variant([v - 1.0 + e for v, e in zip(line, (-0.2165, 0.0, 0.2165), strict=True)], 6.0,
                                fmt="fp16")
    out = {c: (v, e) for c, v, e in report.verdicts(results, None)}
    for rule in ("whole_threshold", "layer_group", "layer_ratio_p0.4", "layer_math"):
        verdict, evidence = out[f"layer-adaptive beats uniform at equal size ({rule}, clf_fid)"]
        assert verdict == "within noise" and "p 0.01" in evidence and "Holm 0.06" in evidence, evidence
    results["layer_math"] = variant([v - 1.0 + e for v, e in zip(line, (-0.0433, 0.0, 0.0433), strict=True)], 6.0,
                                    fmt="fp16")
    out = {c: v for c, v, _ in report.verdicts(results, None)}
    assert out["layer-adaptive beats uniform at equal size (layer_math, clf_fid)"] == "supported"


def test_missing_uniform_of_the_format_is_not_measured():
    results = {"fp32": variant([1.0, 1.0, 1.0], 8.0), "uniform_fp16": variant([1.0, 1.0, 1.0], 4.0),
               "layer_group": variant([1.0, 1.1, 1.2], 5.0, fmt="int8")}
    (_, verdict, evidence), = report.verdicts(results, None)
    assert verdict == "not measured" and "uniform_int8" in evidence


def test_ratio_claim_uses_paired_seeds():
    results = {"fp32": variant([5.0, 5.0, 5.0], 8.0), "uniform_fp16": variant([10.0, 20.0, 30.0], 4.0),
               "layer_ratio_p0.25": variant([9.3, 18.6, 27.9], 6.0, fmt="fp16")}
    out = {c: v for c, v, _ in report.verdicts(results, None)}
    # 7% better on every seed although the seeds differ by far more than 7%: pairing makes it visible
    assert out["ratio p=0.25 improves clf_fid over uniform by ~7% (poster: 24.13 -> 22.42)"] == "supported"


def test_fisher_layer_claim():
    fisher = {"per_layer": {"Layer1": 3.0, "Layer2": 2.0, "Layer3": 1.0, "Layer4": 0.5, "Layer5": 0.1,
                            "Layer6": 0.2}}
    assert report.verdicts({}, fisher)[0][1] == "supported"
    fisher["per_layer"]["Layer6"] = 9.0
    assert report.verdicts({}, fisher)[0][1] == "not supported"


def test_compare_winners_group_identical_allocations():
    from common.experiments.compare import winners

    done = {"a": ("allocator", "fisher", "25%", variant([1.0, 2.0, 3.0], 2.0)),
            "b": ("allocator", "fisher_distortion", "25%", variant([1.0, 2.0, 3.0], 2.0)),
            "c": ("allocator", "random", "25%", variant([3.0, 4.1, 5.0], 2.0)),
            "d": ("allocator", "fisher", "50%", variant([1.0, 1.0, 1.0], 4.0)),
            "e": ("allocator", "random", "50%", variant([1.0, 1.0, 1.0], 4.0))}
    (b25, best, runner, gap, _, verdict), (b50, best50, _, _, _, verdict50) = winners(done, ["25%", "50%"], "clf_fid")
    assert (best, runner, verdict) == ("fisher = fisher_distortion", "random", "clear (paired t-test, 5%)")
    assert gap == pytest.approx(2.0333, abs=1e-3)
    assert best50 == "fisher = random" and verdict50 == "all tie (identical results)"


def test_fisher_op_table_weighs_each_op_type_by_its_elements():
    """Shares are of the total Fisher (mean x elements), largest first; the mean is per weight of the type."""
    import torch

    diag = {"a.qkv.weight": torch.zeros(100), "b.qkv.weight": torch.zeros(300), "a.mlp.weight": torch.zeros(50)}
    fisher = {"diag": diag, "per_tensor": {"a.qkv.weight": 1.0, "b.qkv.weight": 3.0, "a.mlp.weight": 20.0}}
    rows = report.fisher_op_table(fisher, lambda n: n.split(".")[1]).splitlines()[2:]
    # qkv: 100 + 900 = 1000 over 400 weights; mlp: 1000 over 50; total 2000
    assert rows == ["| qkv | 2 | 400 | 2.5 | 50.0% |", "| mlp | 1 | 50 | 20 | 50.0% |"]  # a tie keeps first-seen order
    fisher["per_tensor"]["a.mlp.weight"] = 40.0
    rows = report.fisher_op_table(fisher, lambda n: n.split(".")[1]).splitlines()[2:]
    assert rows == ["| mlp | 1 | 50 | 40 | 66.7% |", "| qkv | 2 | 400 | 2.5 | 33.3% |"]



def test_an_edited_learning_curve_cache_is_recomputed_not_resealed(tiny_cfg, tmp_path, monkeypatch):
    """runs/<run>/learning_curve.json was read without its seal: an edited row was reused and re-sealed."""
    from common.core import storage
    from common.experiments import curve

    snap = tmp_path / "ema_step0000002.safetensors"
    snap.write_bytes(b"weights")
    calls = []

    def fake(cfg, path, device, progress=True):
        calls.append(path)
        return {"step": 2, "images_seen": 4, "clf_is": 5.0, "clf_fid": 10.0, "fid": None}

    monkeypatch.setattr(curve, "evaluate_snapshot", fake)
    assert curve.learning_curve(tiny_cfg, [str(snap)], "cpu")[0]["clf_is"] == 5.0
    assert curve.learning_curve(tiny_cfg, [str(snap)], "cpu")[0]["clf_is"] == 5.0 and len(calls) == 1  # reused
    path = os.path.join(storage.run_dir(tiny_cfg), "learning_curve.json")
    rec = json.load(open(path))
    next(v for k, v in rec.items() if k != storage.SEAL)["clf_is"] = 9.9  # edited by hand, seal left as it was
    json.dump(rec, open(path, "w"))
    assert curve.learning_curve(tiny_cfg, [str(snap)], "cpu")[0]["clf_is"] == 5.0 and len(calls) == 2
    # rows measured against other reference images (another data.root) are measured again, not reused
    from common.evaluation import evaluate

    monkeypatch.setattr(evaluate, "reference_digest", lambda cfg: "other images")
    curve.learning_curve(tiny_cfg, [str(snap)], "cpu")
    assert len(calls) == 3


def test_update_docs_file_is_checked_before_the_run(tmp_path, capsys):
    """--update-docs names a file whose markers are checked when the arguments are parsed, not after the run."""
    import argparse

    from common.experiments.report import add_docs_argument

    p = argparse.ArgumentParser()
    add_docs_argument(p, "lowbit", "docs/lowbit.md")
    good = tmp_path / "good.md"
    good.write_text("<!-- lowbit:start -->\n<!-- lowbit:end -->\n")
    bad = tmp_path / "bad.md"
    bad.write_text("# no markers\n")
    assert p.parse_args(["--update-docs", str(good)]).update_docs == str(good)
    for path, why in ((bad, "markers <!-- lowbit:start --> / <!-- lowbit:end --> not found"),
                      (tmp_path / "none.md", "No such file")):
        with pytest.raises(SystemExit):
            p.parse_args(["--update-docs", str(path)])
        assert why in capsys.readouterr().err


def test_a_budget_without_its_at_sign_says_how_to_write_one():
    from common.core.budget import parse_size_at_bits

    with pytest.raises(ValueError, match=r"'<size>@A<bits>', e.g. '3.5bits@A8'"):
        parse_size_at_bits("3bitsA8")


def test_holm_family_note_counts_this_runs_comparisons_and_seeds():
    """The rule under the poster's verdicts states what Holm asks of this run (not the default run's 3 and 8)."""
    from scipy.stats import t

    from common.experiments.report import EQUAL_SIZE, _family_note

    rows = [(f"{EQUAL_SIZE} (v{i}, fid)", "within noise", "...") for i in range(4)]
    rows += [(f"{EQUAL_SIZE} (v9, fid)", "not measured", "..."), ("ratio p=0.25 improves ...", "within noise", "")]
    note = _family_note({"fp32": {"seeds": [0, 1, 2, 3, 4]}}, rows)
    assert "with 5 seeds and 4 comparisons" in note and "0.05 / 4" in note
    assert f"{t.ppf(1 - 0.05 / 8, 4):.1f} standard errors" in note
    two = _family_note({"fp32": {"seeds": [0, 1, 2]}}, rows[:2])
    assert two.endswith(f"/ 2, a mean of about {t.ppf(1 - 0.05 / 4, 2):.1f} standard errors")
