"""The measured search of lowbit's ``search`` plan on a synthetic, non-additive damage: it stays within the budget,
never measures a configuration twice, keeps the best, stops on evaluations or wall clock, and finds what the
additive optimum misses."""
import json

import numpy as np
import pytest

from common.experiments.search import (
    bops_options,
    calibrated_costs,
    complete_move,
    finalists,
    measured_search,
    plot_trace,
    rerank,
)
from common.quant.allocate import allocate

FORMATS = ("int8", "int4", "int3", "int2")


def _problem(n=10, seed=0):
    rng = np.random.default_rng(seed)
    size = rng.integers(100, 400, n)
    bits = {f"t{i}": {f: int(b * s) for f, b in zip(FORMATS, (8, 4, 3, 2), strict=True)} for i, s in enumerate(size)}
    sens = rng.lognormal(0, 1.0, n)
    sens[:2] = 0.05  # t0, t1 alone tolerate 2 bits: an additive estimate sends both there
    err = dict(zip(FORMATS, (0.0, 1.0, 4.0, 16.0), strict=True))
    additive = {f"t{i}": {f: float(sens[i] * err[f]) for f in FORMATS} for i in range(n)}

    def damage(c):  # two neighbours interact: both at 2-3 bits cost far more than the sum says
        pair = 40.0 * (c["t0"] in ("int3", "int2")) * (c["t1"] in ("int3", "int2"))
        return sum(additive[k][f] for k, f in c.items()) + pair

    return bits, additive, damage


def test_moves_stay_within_the_budget():
    bits, costs, _ = _problem()
    limit = int(0.45 * sum(b["int8"] for b in bits.values()))
    start, _ = allocate(costs, bits, 0, limit)
    for n in bits:
        for f in FORMATS:
            done = complete_move(start, n, f, bits, limit, costs)
            if done is not None:
                new, delta = done
                assert sum(bits[k][v] for k, v in new.items()) <= limit and new[n] == f
                assert delta == pytest.approx(sum(costs[k][v] for k, v in new.items())
                                              - sum(costs[k][v] for k, v in start.items()))


def test_search_improves_on_the_additive_optimum_and_keeps_the_best(tmp_path):
    bits, costs, damage = _problem()
    limit = int(0.45 * sum(b["int8"] for b in bits.values()))
    start, _ = allocate(costs, bits, 0, limit)
    assert start["t0"] in ("int3", "int2") and start["t1"] in ("int3", "int2")  # the trap the sum cannot see
    measured = []

    def measure(c):
        assert sum(bits[k][v] for k, v in c.items()) <= limit
        measured.append(json.dumps(c, sort_keys=True))
        return damage(c)

    best, trace = measured_search(start, bits, limit, costs, measure, seconds=60, max_evals=60, seed=1)
    assert len(measured) == len(set(measured)) == len(trace) <= 61  # never twice; the start is row 0
    assert damage(best) == trace[-1]["best"] == min(r["fitness"] for r in trace) < damage(start) - 20
    assert all(a["best"] >= b["best"] for a, b in zip(trace, trace[1:], strict=False))
    assert plot_trace({"3bits": trace}, str(tmp_path / "trace.png")) and (tmp_path / "trace.png").stat().st_size > 1000


def test_search_stops_on_evaluations_and_on_wall_clock():
    bits, costs, damage = _problem(seed=3)
    limit = int(0.5 * sum(b["int8"] for b in bits.values()))
    start, _ = allocate(costs, bits, 0, limit)
    _, trace = measured_search(start, bits, limit, costs, damage, seconds=60, max_evals=5, seed=0)
    assert len(trace) == 6
    _, trace = measured_search(start, bits, limit, costs, damage, seconds=0, max_evals=50, seed=0)
    assert len(trace) == 1 and trace[0]["move"] == "start"
    with pytest.raises(ValueError, match="over the limit"):
        measured_search(dict.fromkeys(bits, "int8"), bits, limit, costs, damage, 1, 1)


def test_a_one_format_menu_leaves_its_tensor_alone_instead_of_crashing():
    """A tensor whose menu holds one format has no move (the proposer drew from an empty list: numpy's
    'high <= 0'); with every menu that narrow the search is its start."""
    bits, costs, damage = _problem(seed=3)
    limit = int(0.5 * sum(b["int8"] for b in bits.values()))
    start, _ = allocate(costs, bits, 0, limit)
    one = {**bits, "t9": {start["t9"]: bits["t9"][start["t9"]]}}
    best, trace = measured_search(start, one, limit, costs, damage, seconds=60, max_evals=10, seed=0)
    assert best["t9"] == start["t9"] and len(trace) == 11
    narrow = {n: {start[n]: b[start[n]]} for n, b in bits.items()}
    best, trace = measured_search(start, narrow, limit, costs, damage, seconds=60, max_evals=10, seed=0)
    assert best == start and len(trace) == 1


def test_activation_bits_search_raises_one_input_by_lowering_others_within_the_bops():
    """``bops_options``: an input's options are its bit widths at MACs x weight bits x a. From every input at 6
    bits, the search finds the plan that gives the one sensitive input 16 bits and pays with the cheap ones' BOPs,
    never over the start's BOPs."""
    macs = {"big": 1000, "a": 400, "b": 400, "c": 400, "sens": 100}
    w_bits = {"big": 4.0, "a": 4.0, "b": 3.0, "c": 4.25, "sens": 8.0}
    options = bops_options(macs, w_bits, [16, 8, 6, 4])
    assert options["b"][6] == 400 * 3.0 * 6 and set(options["sens"]) == {16, 8, 6, 4}
    start = dict.fromkeys(macs, 6)
    limit = sum(options[n][6] for n in start)
    err = {16: 0.0, 8: 1.0, 6: 4.0, 4: 16.0}
    weight = {"big": 0.01, "a": 0.01, "b": 0.01, "c": 0.01, "sens": 10.0}
    costs = {n: {a: weight[n] * e for a, e in err.items()} for n in macs}
    seen = []

    def measure(c):
        assert sum(options[n][a] for n, a in c.items()) <= limit + 1e-6
        seen.append(c)
        return sum(costs[n][a] for n, a in c.items())

    best, trace = measured_search(start, options, limit, costs, measure, seconds=30, max_evals=40, seed=0)
    assert best["sens"] == 16 and measure(best) < 0.5 * measure(start)
    assert trace[-1]["best"] == min(r["fitness"] for r in trace)


def test_a_whole_configuration_model_orders_the_proposals_and_escapes_the_trap_sooner():
    bits, costs, damage = _problem()
    limit = int(0.45 * sum(b["int8"] for b in bits.values()))
    start, _ = allocate(costs, bits, 0, limit)
    ranked, measured = [], []

    def oracle(configs):  # a model that sees the interaction the additive costs miss
        ranked.append([json.dumps(c, sort_keys=True) for c in configs])
        return [damage(c) for c in configs]

    def measure(c):
        measured.append(json.dumps(c, sort_keys=True))
        return damage(c)

    _, trace = measured_search(start, bits, limit, costs, measure, seconds=60, max_evals=20, seed=1, explore=0.0,
                               rank=oracle)
    # every measured move is the proposal the model ranked first (explore 0: no random pick)
    assert len(ranked) == len(measured) - 1 == len(trace) - 1
    for cands, m in zip(ranked, measured[1:], strict=True):
        assert m == min(cands, key=lambda k: damage(json.loads(k)))

    def evals_to_escape(rank, seed):
        _, tr = measured_search(start, bits, limit, costs, damage, 60, 60, seed=seed, rank=rank)
        return next((r["eval"] for r in tr if r["best"] < damage(start) - 20), 61)

    oracle_evals = [evals_to_escape(lambda cs: [damage(c) for c in cs], s) for s in range(5)]
    additive_evals = [evals_to_escape(None, s) for s in range(5)]
    assert 3 * sum(oracle_evals) <= sum(additive_evals), (oracle_evals, additive_evals)  # 6 against 50 here


def test_rerank_keeps_the_best_on_fresh_noise_not_the_judges_lucky_one():
    """The search's own best is the least of many noisy measurements, so partly luck: of its best few, the one
    least on fresh noise is kept, chosen by the fresh value alone; rows in the search's order."""
    truth = {f"c{i}": 1.0 + 0.1 * i for i in range(10)}  # c0 is truly best
    luck = {"c3": -0.5, "c0": 0.25}  # the judge flatters c3 and wrongs c0
    measured = {json.dumps({"t": k}): truth[k] + luck.get(k, 0.0) for k in truth}
    best = finalists(measured, 6)
    assert [r["config"]["t"] for r in best] == ["c3", "c1", "c2", "c0", "c4", "c5"]
    assert finalists({**measured, json.dumps({"t": "c9"}): 0.8}, 2)[1]["config"] == {"t": "c9"}  # a tie: by key
    fresh = []

    def again(c):
        fresh.append(c["t"])
        return truth[c["t"]]

    choice, rows = rerank(best, 4, again)
    assert [r["config"]["t"] for r in rows] == ["c3", "c1", "c2", "c0"] == fresh  # the best four, once each
    assert choice == {"t": "c0"} and [r["chosen"] for r in rows] == [False, False, False, True]
    assert rows[0]["fitness"] == pytest.approx(0.8) and rows[3]["rerank"] == pytest.approx(1.0)
    assert rerank(best, 1, again)[0] == {"t": "c3"}  # keep 1: the search's own best, whatever fresh says
    assert len(rerank(best, 50, again)[1]) == 6
    with pytest.raises(ValueError, match="keep >= 1"):
        rerank(best, 0, again)


def test_calibrated_costs_take_the_measured_step_and_keep_the_predictors_shape_beyond_it():
    bits = {"a": {"int8": 8, "int4": 4, "int3": 3, "int2": 2}, "b": {"int8": 8, "int4": 4, "int3": 3, "int2": 2}}
    costs = {"a": {"int8": 0.0, "int4": 1.0, "int3": 4.0, "int2": 16.0}, "b": {"int8": 0.0, "int4": 1.0, "int3": 4.0,
                                                                             "int2": 16.0}}
    config = {"a": "int4", "b": "int4"}
    # a: lowering measured 6 (predicted 3: twice as bad) and raising -0.5 (predicted -1); b: raising measured +0.2,
    # against the predictor's sign: the measured step kept, nothing scaled beyond it
    local = calibrated_costs(costs, config, bits, {"a": {"int3": 6.0, "int8": -0.5}, "b": {"int8": 0.2}})
    assert local["a"] == pytest.approx({"int4": 0.0, "int3": 6.0, "int2": 30.0, "int8": -0.5})
    assert local["b"] == pytest.approx({"int4": 0.0, "int8": 0.2, "int3": 3.0, "int2": 15.0})  # down: not measured
    assert calibrated_costs(costs, config, bits, {})["a"] == pytest.approx({"int8": -1.0, "int4": 0.0, "int3": 3.0,
                                                                            "int2": 15.0})


def test_probes_correct_a_predictor_that_misranks_the_tensors():
    """The predictor is the true sensitivities shuffled among the tensors. Calibrated by measured one-step probes,
    the search reaches less damage in the same 100 measurements than the predictor alone proposing (here on 9 of
    10 problems, 15% less in all; the probes cost up to 2 per tensor, spent only on the tensors of the moves
    ranked best); a probe over the budget is never kept, and nothing is measured twice."""
    wins, totals = 0, [0.0, 0.0]
    for seed in range(10):
        bits, costs, damage = _problem(n=20, seed=seed)
        limit = int(0.45 * sum(b["int8"] for b in bits.values()))
        names = sorted(costs)
        perm = np.random.default_rng(seed + 10).permutation(len(names))
        wrong = {n: costs[names[perm[i]]] for i, n in enumerate(names)}
        start, _ = allocate(wrong, bits, 0, limit)
        measured = []

        def measure(c, measured=measured, damage=damage):
            measured.append(json.dumps(c, sort_keys=True))
            return damage(c)

        probed, trace = measured_search(start, bits, limit, wrong, measure, 60, 100, seed=seed, probe=30)
        plain, _ = measured_search(start, bits, limit, wrong, damage, 60, 100, seed=seed)
        wins += damage(probed) < damage(plain)
        totals[0] += damage(probed)
        totals[1] += damage(plain)
        assert len(measured) == len(set(measured)) == len(trace) == 101
        assert any(r.get("probe") for r in trace)
        fits = []
        for r, m in zip(trace, measured, strict=True):
            within = sum(bits[n][f] for n, f in json.loads(m).items()) <= limit
            assert within or not r["accepted"]
            fits += [r["fitness"]] if within else []
        assert trace[-1]["best"] == damage(probed) == min(fits) and sum(bits[n][f] for n, f in probed.items()) <= limit
    assert wins >= 7 and totals[0] < 0.9 * totals[1], (wins, totals)
    with pytest.raises(ValueError, match="two proposers"):
        measured_search(start, bits, limit, wrong, damage, 60, 10, probe=30, rank=lambda cs: [0.0] * len(cs))


def test_a_probe_that_fits_and_does_better_is_kept_like_a_move():
    """A step down that frees bits and lowers the damage (errors that cancel) is a probe the search keeps: its row
    is accepted, the best so far falls there, and nothing is measured twice."""
    bits, costs, damage = _problem(seed=5)
    limit = int(0.5 * sum(b["int8"] for b in bits.values()))
    start, _ = allocate(costs, bits, 0, limit)
    t = next(n for n in sorted(start) if start[n] in ("int8", "int4"))
    lower = FORMATS[FORMATS.index(start[t]) + 1]

    def cancelling(c):  # tensor t one step lower cancels another error
        return damage(c) - (10.0 if c[t] == lower else 0.0)

    measured = []

    def measure(c):
        measured.append(json.dumps(c, sort_keys=True))
        return cancelling(c)

    best, trace = measured_search(start, bits, limit, costs, measure, 60, 40, seed=0, explore=0.0, probe=30)
    kept = [r for r in trace if r.get("probe") and r["accepted"]]
    assert kept and any(r["move"] == f"probe {t} -> {lower}" for r in kept)
    assert len(measured) == len(set(measured)) == len(trace)
    assert all(a["best"] >= b["best"] for a, b in zip(trace, trace[1:], strict=False))
    assert cancelling(best) == trace[-1]["best"] <= cancelling(start) - 10.0
