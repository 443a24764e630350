"""The verdict tables' statistics: paired t p-values (closed form for 2 degrees of freedom), Holm's correction by
hand, the target rule (interval, not point estimate), and the tables that state the correction under them."""
import math

import numpy as np
import pytest

from common.experiments import statistics as st


def _p_df2(d):
    """Student t with 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - |t| / sqrt(2 + t^2)."""
    d = np.asarray(d, float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_paired_p_matches_the_closed_form_for_three_seeds():
    assert st.paired_p([1.0, 2.0, 3.0]) == pytest.approx(1 - math.sqrt(12) / math.sqrt(14), rel=1e-9)  # 0.07418
    assert st.paired_p([1.0, 2.0, 3.0]) == pytest.approx(0.074180, abs=1e-6)
    for d in ([0.5, -0.2, 0.1], [3.0, 3.1, 2.9], [-4.0, -1.0, -2.5]):
        assert st.paired_p(d) == pytest.approx(_p_df2(d), rel=1e-9)
    assert st.paired_p([1.0, np.nan, 2.0, 3.0]) == st.paired_p([1.0, 2.0, 3.0])  # NaN seeds dropped
    assert st.paired_p([2.0]) is None
    assert st.paired_p([0.25, 0.25, 0.25]) == 0.0 and st.paired_p([0.2] * 3) < 1e-20  # no spread, not 0
    assert st.paired_p([0.0, 0.0, 0.0]) == 1.0  # identical samples


def test_holm_adjusts_by_hand():
    # sorted: 0.01 x4 = 0.04; 0.03 x3 = 0.09; 0.04 x2 = 0.08 -> 0.09 (monotone); 0.5 x1 = 0.5
    assert st.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert st.holm([0.3, None, 0.02]) == [pytest.approx(0.3), None, pytest.approx(0.04)]  # None: not counted in m
    assert st.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert st.holm([]) == []


def test_a_cell_significant_alone_is_not_after_holm():
    strong, weak = np.array([1.0, 1.1, 0.9]), np.array([1.0, 2.0, 3.0]) * 0.9 + np.array([0.0, 0.0, 2.0])
    alone = st.paired_p([1.0, 1.5, 1.4])  # 0.0135: significant at 5% on its own
    assert alone < 0.05
    cells = st.verdict_cells([np.array([1.0, 1.5, 1.4])] + [np.array([0.1, -0.1, 0.05])] * 5, [("A", "B")] * 6)
    assert "A better" not in cells[0] and "within noise" in cells[0]  # 6 x 0.0135 > 0.05
    assert f"p_Holm {min(1, 6 * alone):.2g}" in cells[0]
    assert st.paired_verdict(np.array([1.0, 1.5, 1.4]), ("A", "B")).endswith("**A better**")  # uncorrected
    both = st.verdict_cells([strong, -strong], [("A", "B"), ("C", "D")])
    assert both[0].endswith("**A better**") and both[1].endswith("**D better**")
    assert st.paired_p(weak) > 0.05


def test_verdict_table_states_the_correction_under_it():
    rows = [("x vs y", [np.array([1.0, 1.1, 0.9]), np.array([5.0])], ("x", "y")),
            ("x vs z", [np.array([0.0, 0.1, -0.1]), np.array([1.0, 2.0, 3.0])], ("x", "z"))]
    lines = st.verdict_table(rows)
    assert lines[0].startswith("| x vs y | +1 ± 0.058 (p_Holm") and "(one seed: no verdict)" in lines[0]
    assert lines[-2] == "" and "Holm's correction over the 3 tested cells" in lines[-1]


@pytest.mark.parametrize("d, target, verdict", [
    ([1.0, 2.0, 3.0], 12.0, "target met"),                                 # 95% interval [-0.48, 4.48]
    ([1.0, 2.0, 3.0], 4.0, "point estimate within target, interval not"),  # mean 2 <= 4 < 4.48
    ([1.0, 2.0, 3.0], 1.5, "target missed by 0.5"),
])
def test_target_needs_the_whole_interval(d, target, verdict):
    got, mean, lo, hi = st.target_verdict(np.array(d), target)
    assert got == verdict and mean == 2.0
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} x s.e.m. (sd 1)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert st.target_verdict(np.array([1.0]), 5.0)[0] == "one seed: no interval"


def test_compare_winners_table_is_corrected_over_both_metrics_and_all_budgets():
    from common.experiments.compare import winner_lines

    def variant(fid, mse):
        return {"per_seed": {str(s): {"clf_fid": f, "paired_mse_vs_fp32": m} for s, (f, m) in
                             enumerate(zip(fid, mse, strict=True))}, "seeds": [0, 1, 2]}

    done = {"a": ("allocator", "fisher", "25%", variant([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])),
            "b": ("allocator", "random", "25%", variant([2.0, 3.5, 4.4], [0.3, 0.45, 0.48])),
            "c": ("allocator", "fisher", "50%", variant([1.0, 1.0, 1.0], [0.1, 0.1, 0.1])),
            "d": ("allocator", "random", "50%", variant([1.0, 1.0, 1.0], [0.1, 0.1, 0.1]))}
    lines = winner_lines(done, ["25%", "50%"], (("clf_fid", "classifier-FID"), ("paired_mse_vs_fp32", "MSE")))
    gaps = [np.array([1.0, 1.5, 1.4]), np.array([0.2, 0.25, 0.18])]
    adjusted = st.holm([st.paired_p(g) for g in gaps])
    assert f"p_Holm {adjusted[0]:.2g}" in lines[0] and f"p_Holm {adjusted[1]:.2g}" in lines[2]
    assert "all tie" in lines[1] and "Holm's correction over the 2 tested cells" in lines[-1]


def test_sensitivity_trend_sentences_are_holm_corrected_over_the_variants():
    from common.experiments.sensitivity import VARIANTS, trend_sentences

    def metrics(name, mse):
        return {"variant": name, "per_seed": {str(s): {"paired_mse_vs_fp32": m} for s, m in enumerate(mse)}}

    first = {"info": {"step": 100}, **{v: metrics(v, [1.0, 1.0, 1.0]) for v in VARIANTS}}
    last = {"info": {"step": 200}, **{v: metrics(v, [2.0, 2.5, 2.4]) for v in VARIANTS}}
    p = 1 - (1.3 / (math.sqrt(0.07) / math.sqrt(3))) / math.sqrt(2 + 1.3 ** 2 * 3 / 0.07)  # d = 1, 1.5, 1.4: 0.0135
    assert st.paired_p([1.0, 1.5, 1.4]) == pytest.approx(p)
    out = trend_sentences([first, last])
    m = len(VARIANTS)  # three equal p-values: each adjusted to m p
    assert len(out) == m and all(f"Holm over the {m} variants: p_Holm {m * p:.2g}" in s for s in out)
    assert all(("a clear change" in s) == (m * p < 0.05) for s in out)
