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
* the *fitness* is measured: the mean paired MSE of the plan's samples against fp32 over a small batch of
  calibration noise (``lowbit.search_images`` images, ``lowbit.search_seed``: neither an evaluation seed nor the
  noise the plans are scored on); a move is kept when it lowers the fitness ((1+1) hill climbing: first
  improvement, the best so far kept), and a configuration is never measured twice;
* it stops after ``seconds`` of wall clock or ``max_evals`` measurements, whichever comes first;
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


def _used(config, bits):
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
    while _used(new, bits) > limit:  # pay: lower one other tensor a step, least predicted damage per freed bit
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
        room, best = limit - _used(new, bits), None
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


def measured_search(start, bits, limit, costs, measure, seconds, max_evals, seed=0, proposals=8, explore=0.2,
                    rank=None):
    """(best configuration, trace). ``start``: {tensor: format} within ``limit`` stored bits of the tensors
    (``bits`` {tensor: {format: bits}} over the menu); ``costs``: the predictor, {tensor: {format: cost}};
    ``measure(config) -> fitness`` (lower is better); ``rank(configs) -> scores`` (lower is better), when given,
    orders the proposals instead of ``costs``. Trace: one row per measurement, the start first."""
    if _used(start, bits) > limit:
        raise ValueError(f"the start uses {_used(start, bits)} bits, over the limit {limit}")
    rng = np.random.default_rng(seed)
    t0 = time.time()
    current, fit = dict(start), measure(start)
    seen = {tuple(sorted(start.items()))}
    trace = [{"eval": 0, "seconds": round(time.time() - t0, 2), "fitness": fit, "best": fit, "move": "start",
              "accepted": True, "predicted_delta": 0.0}]
    names = sorted(n for n in bits if len(bits[n]) > 1)  # a one-format menu leaves its tensor nothing to move to
    stale = 0 if names else 20  # proposal rounds that found nothing new (no tensor can move: none)
    while len(trace) < max_evals + 1 and time.time() - t0 < seconds and stale < 20:
        candidates = []
        for _ in range(proposals):
            n = names[rng.integers(len(names))]
            options = [f for f in bits[n] if f != current[n]]
            f = options[rng.integers(len(options))]
            done = complete_move(current, n, f, bits, limit, costs)
            if done is not None and tuple(sorted(done[0].items())) not in seen:
                candidates.append((done[1], n, f, done[0]))
        if not candidates:
            stale += 1
            continue
        stale = 0
        candidates.sort(key=lambda c: c[0])
        if rank is not None:  # a stable sort: on a tie the additive prediction decides
            scores = np.asarray(rank([c[3] for c in candidates]), dtype=float)
            candidates = [candidates[i] for i in np.argsort(scores, kind="stable")]
        pick = candidates[rng.integers(len(candidates))] if rng.random() < explore else candidates[0]
        delta, n, f, config = pick
        seen.add(tuple(sorted(config.items())))
        value = measure(config)
        accepted = value < fit
        if accepted:
            current, fit = config, value
        trace.append({"eval": len(trace), "seconds": round(time.time() - t0, 2), "fitness": value, "best": fit,
                      "move": f"{n} -> {f}", "accepted": bool(accepted), "predicted_delta": float(delta)})
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
        ax.scatter(x, [r["fitness"] for r in trace], s=8, color=f"C{i}", alpha=0.5)
        ax.plot(x, [r["best"] for r in trace], color=f"C{i}", label=f"{label} (best so far)")
    ax.set_yscale("log")
    ax.set_xlabel("measured configurations")
    ax.set_ylabel("paired MSE vs fp32 (search batch)")
    ax.set_title("measured search: fitness against evaluations (dots: every candidate)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
