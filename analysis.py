"""
Learning-forgetting analysis, as the paper measures it.

Each base model is fine-tuned at a sweep of learning rates; every run is a point (ft_loss, pt_loss): validation
loss on the fine-tuning task (learning) and on held-out pretraining data (forgetting). The frontier is the lower
convex hull of those points. Base models are compared at matched fine-tuning loss: the threshold is the largest of
their best ft_losses, each frontier's pt_loss is read there, and forgetting = that - the base model's own pt_loss.

    python analysis.py out/sft/*/result.json [--baseline=adamw]
"""
import json
import math
import sys
import warnings

import numpy as np

from config import fail


def _cross(o, a, b):
    # > 0: o -> a -> b turns counter-clockwise, i.e. a lies strictly below the chord o-b
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def lower_convex_hull(points):
    """Vertices of the lower convex hull of [(ft_loss, pt_loss), ...], sorted by ft_loss (Andrew's monotone chain).

    Duplicates and ties: at a repeated ft_loss only the lowest pt_loss is kept (the others can't be on the lower
    hull), so the hull has strictly increasing ft_loss and no vertical edge: it is a function of ft_loss.
    Collinear points: a point exactly on the chord of its neighbours is dropped (only corners are vertices); a point
    off it by rounding error may stay, which changes no interpolated value. Points must be finite.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if len(pts) == 0 or not np.isfinite(pts).all():
        raise ValueError("lower_convex_hull needs at least one point, all finite (frontier() drops diverged runs)")
    lowest = {}
    for x, y in pts.tolist():
        lowest[x] = min(y, lowest.get(x, math.inf))
    hull = []
    for p in sorted(lowest.items()):
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()  # hull[-1] is on or above the chord hull[-2] -> p
        hull.append(p)
    return hull


def frontier(points):
    """The learning-forgetting frontier: the lower-left part of the lower convex hull, as [(ft, pt), ...].

    It runs from the run with the smallest ft_loss (highest useful lr) to the hull vertex with the smallest pt_loss
    (the leftmost one if tied). Past that vertex the lower hull may rise again, but every point there is beaten on
    both losses by that vertex, so it is cut off: the frontier is convex and non-increasing. Runs with a non-finite
    loss (diverged) are dropped: they can't be on it. Idempotent: frontier(frontier(p)) == frontier(p).
    """
    finite = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not finite:
        raise ValueError(f"no finite (ft_loss, pt_loss) point among {len(points)} runs")
    hull = lower_convex_hull(finite)
    lowest = min(range(len(hull)), key=lambda i: hull[i][1])  # min() returns the first, i.e. leftmost, minimum
    return hull[:lowest + 1]


def pretrain_loss_at(hull, ft_loss):
    """pt_loss on the frontier at ft_loss, linearly interpolated between its vertices.

    hull: frontier() vertices (raw sweep points work too: the frontier is recomputed, which is idempotent).
    Below the best ft_loss no run (nor mixture of runs) learned that much: ValueError. Above the frontier's right
    end the value is its lowest pt_loss: a run with that pt_loss learned at least this much (lower ft_loss), so the
    frontier read as "least pt_loss among runs that learned at least this much" is flat there.
    """
    xs, ys = np.array(frontier(hull)).T
    if not ft_loss >= xs[0]:  # also rejects nan
        raise ValueError(f"ft_loss {ft_loss:.6g} is below the frontier's range: its best ft_loss is {xs[0]:.6g}")
    return float(np.interp(ft_loss, xs, ys))  # np.interp holds ys[-1] beyond xs[-1]


def matched_forgetting(sweeps, base_pt_loss):
    """Forgetting of each base model at matched fine-tuning loss.

    sweeps: {name: [(ft_loss, pt_loss), ...]}, base_pt_loss: {name: the base model's own pt_loss}.
    The threshold is the largest of the models' best ft_losses: the lowest ft_loss every model reaches.
    Returns {'threshold', 'forgetting': {name: F}, 'pt_loss_at_threshold': {name: pt}, 'frontier': {name: [...]}}.
    For the 1B variant pass (ft_loss, score_drop(B, score)) points and a base value of 0.
    """
    missing = sorted(set(sweeps) - set(base_pt_loss))
    if not sweeps or missing:
        raise ValueError(f"need >= 1 sweep and a base pt_loss for each; missing base pt_loss for {missing}")
    fronts = {name: frontier(points) for name, points in sweeps.items()}
    threshold = max(front[0][0] for front in fronts.values())
    pt_at = {name: pretrain_loss_at(front, threshold) for name, front in fronts.items()}
    forgetting = {name: pt_at[name] - base_pt_loss[name] for name in sweeps}
    return {'threshold': threshold, 'forgetting': forgetting, 'pt_loss_at_threshold': pt_at, 'frontier': fronts}


def percent_less_forgetting(f_baseline, f_other):
    """100 * (F_baseline - F_other) / F_baseline: positive = other forgets less (80 = 80% less), negative = more.
    Undefined if the baseline did not forget (F_baseline <= 0): nan, not a sign-flipped or infinite percentage."""
    if not f_baseline > 0:
        return math.nan
    return 100.0 * (f_baseline - f_other) / f_baseline


def area_percent_less(baseline_points, other_points, baseline_base_pt, other_base_pt):
    """The grid-robust companion to the matched-loss figure: % less forgetting over the whole range of fine-tuning
    losses both frontiers cover, 100 * (area under F_baseline - area under F_other) / area under F_baseline.

    The range runs from the matched threshold (the larger best ft_loss) to the smaller of the two frontiers' right
    ends. Both frontiers are piecewise linear, so the trapezoid rule on the union of their vertices is exact. One run
    more or less near the top moves the single-threshold figure by whatever the frontier's steep end does there; here
    it moves only a sliver of the range. nan when the frontiers share no range or the baseline forgot nothing.
    """
    fronts = [frontier(baseline_points), frontier(other_points)]
    lo, hi = max(f[0][0] for f in fronts), min(f[-1][0] for f in fronts)
    if not hi > lo:
        return math.nan
    xs = np.unique([lo, hi] + [x for f in fronts for x, _ in f if lo < x < hi])
    areas = [np.trapezoid(np.interp(xs, *np.array(f).T) - base, xs)
             for f, base in zip(fronts, (baseline_base_pt, other_base_pt))]
    return percent_less_forgetting(areas[0], areas[1])


def sft_figures(seeds, baseline, other):
    """Both % less figures of `other` against `baseline`: {task: (matched, area)}, each the mean over seeds, and
    'mean' over the tasks where it is defined. seeds: [{task: {model: (points, base_pt)}}], one dict per seed."""
    per_task = {}
    for runs in seeds:
        for task, models in runs.items():
            (pb, bb), (po, bo) = models[baseline], models[other]
            try:
                matched = matched_forgetting({baseline: pb, other: po}, {baseline: bb, other: bo})['forgetting']
                values = percent_less_forgetting(matched[baseline], matched[other]), area_percent_less(pb, po, bb, bo)
            except ValueError:  # a bootstrap replicate drew only diverged runs of one model
                values = math.nan, math.nan
            per_task.setdefault(task, []).append(values)
    figures = {task: tuple(np.mean(values, axis=0)) for task, values in per_task.items()}
    with warnings.catch_warnings():  # a figure undefined on every task stays nan
        warnings.simplefilter('ignore', RuntimeWarning)
        figures['mean'] = tuple(np.nanmean(list(figures.values()), axis=0))  # over the tasks where it is defined
    return figures


def quantization_figures(seeds, baseline, other):
    """% less quantization forgetting, the mean over seeds: {'%': value}. seeds: [{model: per-batch pretraining-loss
    increases of the quantized model over the base, on the same batches}]."""
    return {'%': float(np.mean([percent_less_forgetting(np.mean(s[baseline]), np.mean(s[other])) for s in seeds]))}


def resample_runs(runs, rng):
    """A bootstrap replicate of one seed's fine-tuning sweeps. Every model of a task was swept over the same learning
    rates (points in the same order), so the same rates are drawn for all of them: a replicate is the comparison
    as another grid would have made it, without misaligning the two sweeps."""
    replicate = {}
    for task, models in runs.items():
        n = len(next(iter(models.values()))[0])
        index = rng.integers(n, size=n)
        replicate[task] = {model: ([points[i] for i in index], base_pt) for model, (points, base_pt) in models.items()}
    return replicate


def resample_batches(increases, rng):
    """A bootstrap replicate of one seed's evaluation: the same batches drawn for every model (losses are paired)."""
    index = rng.integers(len(next(iter(increases.values()))), size=len(next(iter(increases.values()))))
    return {model: np.asarray(values)[index] for model, values in increases.items()}


def bootstrap(seeds, figures, resample, n_boot=1000, level=0.95, seed=0):
    """Percentile bootstrap of figures(seeds) (a dict of numbers or tuples): each replicate draws the pretraining seeds
    with replacement (when there are several), then resamples within each drawn seed. Returns {key: (estimate, low,
    high)} with elementwise tuples; replicates where a figure is undefined (nan) are left out of its interval."""
    rng = np.random.default_rng(seed)
    estimate = figures(seeds)
    replicates = []
    for _ in range(n_boot):
        drawn = [seeds[i] for i in rng.integers(len(seeds), size=len(seeds))] if len(seeds) > 1 else seeds
        replicates.append(figures([resample(s, rng) for s in drawn]))
    def interval(values):  # nan-free percentiles of one figure over the replicates
        finite = values[np.isfinite(values)]
        if len(finite) == 0:
            return math.nan, math.nan
        tail = 100 * (1 - level) / 2
        return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))

    result = {}
    for key, value in estimate.items():
        values = np.array([np.atleast_1d(r.get(key, np.nan)) for r in replicates], dtype=float)
        bounds = [interval(values[:, j]) for j in range(values.shape[1])]
        if isinstance(value, tuple):
            result[key] = (tuple(map(float, value)), tuple(b[0] for b in bounds), tuple(b[1] for b in bounds))
        else:
            result[key] = (float(value), *bounds[0])
    return result


def verdict(low, high):
    """What an interval says about % less forgetting."""
    if low > 0:
        return 'less forgetting'
    if high < 0:
        return 'more forgetting'
    return 'no detectable difference'


def quantization_forgetting(base_pt_loss, quantized_pt_loss):
    """Forgetting from quantization (small models): the pt_loss increase; positive = forgot."""
    return quantized_pt_loss - base_pt_loss


def score_drop(baseline_score, score):
    """1B forgetting: 100 * (B - score) / B, B = the AdamW base model's mean benchmark score for both optimizers,
    so the SAM base model's own head start counts too. Positive = worse than B; nan if B <= 0 (a broken eval)."""
    if not baseline_score > 0:
        return math.nan
    return 100.0 * (baseline_score - score) / baseline_score


def matched_score_drop(sweeps, baseline_score, baseline):
    """The 1B variant of matched_forgetting: forgetting as a benchmark-score drop at matched fine-tuning loss.

    sweeps: {name: [(ft_loss, score), ...]} (each fine-tuned model's task loss and mean benchmark score),
    baseline_score: B, the baseline's base model's score. Every run becomes the point (ft_loss, score_drop(B, score)),
    and the frontiers of these points are compared as matched_forgetting compares pt_loss
    frontiers, with a base value of 0 (a base model's own head start over B counts, as score_drop says).
    Returns matched_forgetting's dict (forgetting = score drop at the threshold, in %) plus 'percent_less':
    {name: % less score drop than the baseline} for the other models."""
    if baseline not in sweeps:
        raise ValueError(f"no sweep of the baseline {baseline!r}")
    drops = {name: [(ft, score_drop(baseline_score, s)) for ft, s in points] for name, points in sweeps.items()}
    matched = matched_forgetting(drops, dict.fromkeys(drops, 0.0))
    f = matched['forgetting']
    matched['percent_less'] = {name: percent_less_forgetting(f[baseline], f[name]) for name in f if name != baseline}
    return matched


# ----------------------------------------------------------------------------- CLI

def _field(result, key, path, kind):
    """result['a']['b'] for key 'a.b', type-checked; one line and exit if missing or of the wrong type."""
    value = result
    for part in key.split('.'):
        if not isinstance(value, dict) or part not in value:
            fail(f"{path}: missing field {key!r}")
        value = value[part]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number if kind is float else isinstance(value, str)):
        fail(f"{path}: field {key!r} must be a {'number' if kind is float else 'string'}, got {value!r}")
    return value


def load_results(paths):
    """{task: {init_from: [(ft_loss, pt_loss, learning_rate, base_pt_loss), ...]}} from finetune result.json files."""
    runs = {}
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: not JSON (JSONDecodeError) or not text
            fail(f"{path}: cannot read JSON: {e}")
        if isinstance(result, dict) and 'final' in result and result['final'] is None:
            fail(f"{path}: the run has not finished (final is null); finish it with finetune.py --init_from=resume")
        task, init_from = _field(result, 'task', path, str), _field(result, 'init_from', path, str)
        lr, base_pt = _field(result, 'learning_rate', path, float), _field(result, 'base.pt_val_loss', path, float)
        ft, pt = _field(result, 'final.ft_val_loss', path, float), _field(result, 'final.pt_val_loss', path, float)
        if not math.isfinite(base_pt):  # a diverged fine-tuning run is data; a broken base model is not
            fail(f"{path}: base.pt_val_loss is {base_pt}")
        runs.setdefault(task, {}).setdefault(init_from, []).append((ft, pt, lr, base_pt))
    return runs


def compare(task, models, baseline):
    """matched_forgetting for one task's base models, and the name of the baseline among them."""
    if len(models) < 2:
        fail(f"task {task!r}: only one base model ({next(iter(models))}); forgetting is compared between models")
    matches = [name for name in models if baseline.lower() in name.lower()]
    if len(matches) != 1:
        fail(f"task {task!r}: --baseline={baseline} must match exactly one init_from, matched {len(matches)}: "
             f"{', '.join(matches or sorted(models))}")
    for name, runs in models.items():  # the same checkpoint should give the same base loss: different eval settings?
        if max(r[3] for r in runs) - min(r[3] for r in runs) > 1e-3:
            print(f"warning: task {task!r}, {name}: base pt_val_loss differs between runs", file=sys.stderr)
    base_pt = {name: float(np.mean([r[3] for r in runs])) for name, runs in models.items()}
    try:
        return matched_forgetting({name: [r[:2] for r in runs] for name, runs in models.items()}, base_pt), matches[0]
    except ValueError as e:
        fail(f"task {task!r}: {e}")


def report(task, models, res, baseline):
    print(f"task {task}: {len(models)} base models, threshold ft_loss {res['threshold']:.4f}, baseline {baseline}")
    for name in [baseline] + sorted(set(models) - {baseline}):
        runs, F = models[name], res['forgetting'][name]
        lr_of = {(r[0], r[1]): r[2] for r in runs}  # which learning rates made the frontier
        diverged = sum(not (math.isfinite(r[0]) and math.isfinite(r[1])) for r in runs)
        print(f"  {name}: {len(runs)} runs ({diverged} diverged), base pt_loss {np.mean([r[3] for r in runs]):.4f}")
        print("    frontier (lr: ft_loss, pt_loss): " +
              "  ".join(f"{lr_of[p]:.2e}: ({p[0]:.4f}, {p[1]:.4f})" for p in res['frontier'][name]))
        versus = "(baseline)" if name == baseline else \
            f"{percent_less_forgetting(res['forgetting'][baseline], F):.1f}% less forgetting than baseline"
        print(f"    pt_loss at threshold {res['pt_loss_at_threshold'][name]:.4f}, forgetting {F:.4f} {versus}")


def main(argv):
    paths = [arg for arg in argv if not arg.startswith('--')]
    baseline = 'adamw'
    for arg in [arg for arg in argv if arg.startswith('--')]:
        if not arg.startswith('--baseline='):
            fail(f"unknown option {arg!r}; usage: analysis.py result.json ... [--baseline=<substring of init_from>]")
        baseline = arg.partition('=')[2]
    if not paths:
        fail("no result files; usage: analysis.py result.json ... [--baseline=<substring of init_from>]")
    runs = load_results(paths)
    compared = {task: compare(task, models, baseline) for task, models in sorted(runs.items())}  # all checks first
    for task, (res, baseline_name) in compared.items():
        report(task, runs[task], res, baseline_name)


if __name__ == '__main__':
    main(sys.argv[1:])
