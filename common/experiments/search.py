"""A measured search over per-tensor formats at a fixed budget (``lowbit``'s ``search`` plan).

Every sensitivity of ``lowbit`` is additive: the damage of a plan is the sum of its tensors' costs. The final
samples' damage is not (errors saturate and interact through the chain), so the allocator's optimum of an
additive estimate is a good start, not the end. This search starts from such a plan (the chain-aware Fisher's)
and moves by measurement:

* a *move* changes one tensor's format and pays for it at the fixed budget: raising a tensor lowers others, one
  format step at a time, cheapest predicted damage per freed bit first; lowering one raises the tensor whose
  predicted gain per bit is largest while it fits. Every candidate stays within the budget;
* the predictor (the learned costs, else the chain-aware Fisher's) *proposes*: of ``proposals`` random moves the
  one with the least predicted damage increase is measured, except with probability ``explore`` a random one
  (the predictor is what is being corrected; it must not decide alone). With ``rank`` (a model of whole
  configurations, e.g. ``importance.interaction``: not additive, so it sees what a move does beside the rest)
  the candidates are ordered by its prediction of the completed configuration instead; the additive costs still
  pick how each move is paid for;
* the *fitness* is measured: the paired MSE of the plan's samples against fp32 over a small batch of
  calibration noise (``lowbit.search_images`` images, ``lowbit.search_seed``: neither an evaluation seed nor the
  noise the plans are scored on), their mean or geometric mean (``lowbit.search_statistic``); a move is kept
  when it lowers the fitness ((1+1) hill climbing: first improvement, the best so far kept), and a configuration
  is never measured twice;
* it stops after ``seconds`` of wall clock or ``max_evals`` measurements, whichever comes first;
* optionally (``probe``) the proposer is corrected by measurement where the search stands: a tensor's one
  format step up and one step down, each alone, are measured from the current configuration (a *probe*; it may
  leave the budget and is then never kept; one that fits and does better is kept like a move), the predictor's
  costs of that tensor are rescaled per direction so that its one-step changes equal the measured ones (the
  unprobed tensors' by the median measured-to-predicted ratio), and of every move (not ``proposals`` random
  ones) the one whose completion the rescaled costs rank lowest is measured, paid for by them too. Probing is
  lazy: the best-ranked move's unprobed tensors are probed, everything is ranked again, until the best move
  touches only probed tensors; a kept move's tensors are probed again when next needed, every tensor after
  ``probe`` rejected moves in a row; ``explore`` still measures a random move (unprobed) that often. Near the
  optimum the predictor ranks neighbouring moves no better than chance, yet a single step's measured effect is
  the judge's own number. On the released U-Net it drove the judge's fitness lowest, and not the damage on fresh
  noise (docs/lowbit.md): it is opt-in;
* optionally (``rerank``) its best few are measured again on fresh noise and the best there is the result: the
  search keeps whatever its small judge scored lowest, so its own best is partly the judge's luck (the winner's
  curse: on the retest noise the released U-Net's 3.5-bit search ended on its 21st-best visited configuration).

The trace (fitness of every measured candidate, the best so far, the seconds) is returned, written and plotted.
The same search moves activation bits at fixed weights (``bops_options``: an input's options are its bit widths,
what it pays with its BOPs), the second half of ``lowbit``'s joint ``search_wa`` plan.
"""
import json
import time

import numpy as np

from .report import pyplot, save_figure


def used_bits(config, bits):
    """The stored bits of ``config`` ({tensor: format}) over ``bits`` ({tensor: {format: bits}})."""
    return sum(bits[n][f] for n, f in config.items())


def _steps(bits, n):
    """The formats of tensor ``n`` ordered by stored bits (fewest first)."""
    return sorted(bits[n], key=lambda f: bits[n][f])


def complete_move(config, n, f, bits, limit, costs):
    """``config`` with tensor ``n`` in format ``f``, made to fit ``limit`` bits again (or to use freed bits), and
    the predicted change of damage; None when it cannot fit."""
    new = dict(config)
    new[n] = f
    delta = costs[n][f] - costs[n][config[n]]
    while used_bits(new, bits) > limit:  # pay: lower one other tensor a step, least predicted damage per freed bit
        best = None
        for m in new:
            if m == n:
                continue
            order = _steps(bits, m)
            i = order.index(new[m])
            if i == 0:
                continue
            g = order[i - 1]
            freed = bits[m][new[m]] - bits[m][g]
            ratio = (costs[m][g] - costs[m][new[m]]) / max(freed, 1)
            if best is None or ratio < best[0]:
                best = (ratio, m, g)
        if best is None:
            return None
        _, m, g = best
        delta += costs[m][g] - costs[m][new[m]]
        new[m] = g
    while True:  # spend: raise one other tensor a step where the predicted gain per bit is largest and it fits
        room, best = limit - used_bits(new, bits), None
        for m in new:
            if m == n:
                continue
            order = _steps(bits, m)
            i = order.index(new[m])
            if i + 1 == len(order):
                continue
            g = order[i + 1]
            extra = bits[m][g] - bits[m][new[m]]
            gain = costs[m][new[m]] - costs[m][g]
            if extra <= room and gain > 0 and (best is None or gain / max(extra, 1) > best[0]):
                best = (gain / max(extra, 1), m, g)
        if best is None:
            break
        _, m, g = best
        delta += costs[m][g] - costs[m][new[m]]
        new[m] = g
    return new, delta


def calibrated_costs(costs, config, bits, steps, scale=1.0) -> dict:
    """{tensor: {format: cost}} relative to ``config`` (its own format 0): the predictor's ``costs`` of each tensor
    scaled, separately up and down, by the measured change of its adjacent format (``steps`` {tensor: {format:
    measured change of fitness}}), so that the one-step changes are the measured ones and the farther formats
    keep the predictor's shape. Where the predictor's step is zero or of the other sign, the measured step is kept
    and the predictor's differences beyond it are added times ``scale``; a direction not measured keeps the
    predictor times ``scale`` (its units turned into the measurement's)."""
    out = {}
    for n, formats in bits.items():
        c0, here = costs[n][config[n]], bits[n][config[n]]
        row = {f: (costs[n][f] - c0) * scale for f in formats}
        for g, d in steps.get(n, {}).items():
            pred = costs[n][g] - c0
            ratio = d / pred if pred * d > 0 else scale
            for f in formats:
                if (bits[n][f] - here) * (bits[n][g] - here) > 0:  # the same direction as the measured step
                    row[f] = d + (costs[n][f] - costs[n][g]) * ratio
        out[n] = row
    return out


def measured_search(start, bits, limit, costs, measure, seconds, max_evals, seed=0, proposals=8, explore=0.2,
                    rank=None, probe=0):
    """(best configuration, trace). ``start``: {tensor: format} within ``limit`` stored bits of the tensors
    (``bits`` {tensor: {format: bits}} over the menu); ``costs``: the predictor, {tensor: {format: cost}};
    ``measure(config) -> fitness`` (lower is better); ``rank(configs) -> scores`` (lower is better), when given,
    orders the proposals instead of ``costs``; ``probe`` > 0: the predictor calibrated by measured one-step probes
    (module docstring), every tensor probed again after that many rejected candidates in a row. Trace: one row per
    measurement, the start first; a probe's row has ``"probe": True`` (accepted only where it fits the budget and
    does better); ``predicted_delta`` is in the predictor's units, with ``probe`` in the measurement's."""
    if used_bits(start, bits) > limit:
        raise ValueError(f"the start uses {used_bits(start, bits)} bits, over the limit {limit}")
    if probe and rank is not None:
        raise ValueError("measured_search: probe and rank are two proposers; give one")
    rng = np.random.default_rng(seed)
    t0 = time.time()
    current, fit = dict(start), measure(start)
    values = {tuple(sorted(start.items())): fit}  # every configuration measured, probes included: never twice
    trace = [{"eval": 0, "seconds": round(time.time() - t0, 2), "fitness": fit, "best": fit, "move": "start",
              "accepted": True, "predicted_delta": 0.0}]
    names = sorted(n for n in bits if len(bits[n]) > 1)  # a one-format menu leaves its tensor nothing to move to
    stale = 0 if names else 20  # proposal rounds that found nothing new (no tensor can move: none)

    def running():
        return len(trace) < max_evals + 1 and time.time() - t0 < seconds

    steps, ratios, rejected = {}, {}, 0  # per probed tensor: measured change and measured / predicted, per step

    def probe_tensors(tensors):  # each tensor's adjacent formats measured alone, relative to ``fit``
        nonlocal current, fit
        queue = list(tensors)
        while queue:
            n = queue.pop(0)
            order = _steps(bits, n)
            i = order.index(current[n])
            steps[n], ratios[n] = {}, {}
            for g in order[max(i - 1, 0):i] + order[i + 1:i + 2]:
                if bits[n][g] == bits[n][current[n]]:  # no direction: a swap at equal bits is ranked, not probed
                    continue
                config = {**current, n: g}
                key = tuple(sorted(config.items()))
                if key not in values:
                    if not running():
                        return
                    values[key] = float(measure(config))
                    # a step that fits and does better is a move like any other: kept, its tensor probed again
                    kept = bool(values[key] < fit and used_bits(config, bits) <= limit)
                    if kept:
                        current, fit = config, values[key]
                        queue.append(n)
                    trace.append({"eval": len(trace), "seconds": round(time.time() - t0, 2), "fitness": values[key],
                                  "best": fit, "move": f"probe {n} -> {g}", "accepted": kept, "predicted_delta":
                                  float(costs[n][g] - costs[n][order[i]]), "probe": True})
                    if kept:
                        break
                steps[n][g] = d = values[key] - fit
                pred = costs[n][g] - costs[n][order[i]]
                if pred * d > 0:
                    ratios[n][g] = d / pred

    def completed(moves, by):  # the moves made to fit the budget by the costs ``by``, unmeasured ones, least first
        out = []
        for n, f in moves:
            done = complete_move(current, n, f, bits, limit, by)
            if done is not None and tuple(sorted(done[0].items())) not in values:
                out.append((done[1], n, f, done[0]))
        return sorted(out, key=lambda c: c[0])  # stable: on a tie the proposal order decides

    while running() and stale < 20:
        if probe:
            # lazily: the best-ranked move's tensors are probed before it is measured, then everything is ranked
            # again, until the best-ranked move touches only probed tensors (the rest keep the predictor, scaled)
            wander = rng.random() < explore  # drawn first: a random move needs no probes
            while running():
                measured_ratios = [r for by in ratios.values() for r in by.values()]
                local = calibrated_costs(costs, current, bits, steps,
                                         float(np.median(measured_ratios)) if measured_ratios else 1.0)
                candidates = completed([(n, f) for n in names for f in bits[n] if f != current[n]], local)
                fresh = [m for m in names if candidates and candidates[0][3][m] != current[m] and m not in steps]
                if wander or not fresh:
                    break
                probe_tensors(fresh)
            if not running():
                break
            if not candidates:  # every move's completion measured: fresh probes may complete them otherwise
                if not steps:
                    break
                steps.clear()
                ratios.clear()
                continue
            if wander:
                candidates = [candidates[rng.integers(len(candidates))]]
        else:
            moves = []
            for _ in range(proposals):
                n = names[rng.integers(len(names))]
                options = [f for f in bits[n] if f != current[n]]
                moves.append((n, options[rng.integers(len(options))]))
            candidates = completed(moves, costs)
        if not candidates:
            stale += 1
            continue
        stale = 0
        if rank is not None:  # a stable sort: on a tie the additive prediction decides
            scores = np.asarray(rank([c[3] for c in candidates]), dtype=float)
            candidates = [candidates[i] for i in np.argsort(scores, kind="stable")]
        pick = candidates[rng.integers(len(candidates))] if not probe and rng.random() < explore else candidates[0]
        delta, n, f, config = pick
        value = values[tuple(sorted(config.items()))] = measure(config)
        accepted = value < fit
        changed = [m for m in names if config[m] != current[m]]
        if accepted:
            current, fit = config, value
        trace.append({"eval": len(trace), "seconds": round(time.time() - t0, 2), "fitness": value, "best": fit,
                      "move": f"{n} -> {f}", "accepted": bool(accepted), "predicted_delta": float(delta)})
        if probe:
            rejected = 0 if accepted else rejected + 1
            if accepted:  # the tensors it moved stand elsewhere now (the others' steps are kept: approximately so)
                for m in changed:
                    steps.pop(m, None)
                    ratios.pop(m, None)
            if rejected >= probe:  # the probes have aged: measured again as the moves need them
                steps.clear()
                ratios.clear()
                rejected = 0
    return current, trace


def finalists(measured: dict, n: int) -> list:
    """The ``n`` configurations of least fitness of ``measured`` ({json of a configuration: fitness}), least first
    (a tie broken by the configuration, reproducibly): [{"config", "fitness"}]."""
    return [{"config": json.loads(k), "fitness": float(measured[k])}
            for k in sorted(measured, key=lambda k: (measured[k], k))[:n]]


def rerank(best: list, keep: int, measure):
    """(configuration, rows): the first ``keep`` of ``best`` (``finalists``: the search's least-fitness
    configurations, least first) each measured again by ``measure`` (other noise than the search's) and the least
    there chosen. Chosen by the fresh measurement alone: the search's value is what picked these few, so mixing it
    in would carry its luck back in (the kept one's fresh value is in turn the least of ``keep`` noisy values, so it
    reads low: only a third noise judges it fairly). Rows: {"config", "fitness" (the search's), "rerank" (the
    fresh one), "chosen"}."""
    if keep < 1 or not best:
        raise ValueError(f"rerank: needs at least one finalist and keep >= 1, got {len(best)} and keep={keep}")
    rows = [{**r, "rerank": float(measure(r["config"]))} for r in best[:keep]]
    pick = min(range(len(rows)), key=lambda i: (rows[i]["rerank"], i))
    for i, r in enumerate(rows):
        r["chosen"] = i == pick
    return rows[pick]["config"], rows


def bops_options(macs: dict, w_bits: dict, a_menu) -> dict:
    """The options of an activation-bits search at fixed weights: {input: {a: its BOPs, MACs x w_bits x a}} for
    every input of ``w_bits`` ({module: its weights' stored bits per element; a ``Fraction`` keeps the sums exact,
    so a swap that balances exactly is never refused by rounding}); ``measured_search`` with these as ``bits``
    and a BOPs limit keeps every candidate within that many bit-operations."""
    return {n: {int(a): macs[n] * w * int(a) for a in a_menu} for n, w in w_bits.items()}


def plot_trace(traces: dict, path: str) -> str:
    """Fitness of every measured candidate and the best so far, per search ({label: trace})."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, trace) in enumerate(traces.items()):
        x = [r["eval"] for r in trace]
        moves = [r for r in trace if not r.get("probe")]
        probes = [r for r in trace if r.get("probe")]  # one tensor stepped alone (may leave the budget)
        ax.scatter([r["eval"] for r in moves], [r["fitness"] for r in moves], s=8, color=f"C{i}", alpha=0.5)
        if probes:
            ax.scatter([r["eval"] for r in probes], [r["fitness"] for r in probes], s=8, color=f"C{i}", alpha=0.3,
                       marker="x")
        ax.plot(x, [r["best"] for r in trace], color=f"C{i}", label=f"{label} (best so far)")
    ax.set_yscale("log")
    ax.set_xlabel("measured configurations")
    ax.set_ylabel("paired MSE vs fp32 (search batch)")
    ax.set_title("measured search: fitness against evaluations (dots: candidates, crosses: probes)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
