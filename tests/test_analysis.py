"""analysis.py on hand-made points whose answers are worked out in the comments."""
import json
import math
import os
import subprocess
import sys

import pytest

import numpy as np

from analysis import (area_percent_less, bootstrap, frontier, lower_convex_hull, matched_forgetting,
                      percent_less_forgetting, pretrain_loss_at, quantization_figures, quantization_forgetting,
                      resample_batches, resample_runs, score_drop, sft_figures, verdict)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
approx = pytest.approx

# model A: (2.2, 3.3) is below the chord (2.0, 3.5)-(2.6, 3.2), which at 2.2 is 3.5 - 0.3 * 0.2/0.6 = 3.4,
# so all three are hull vertices
A = [(2.0, 3.5), (2.2, 3.3), (2.6, 3.2)]
B = [(2.1, 3.2), (2.4, 3.1)]


def test_hull_drops_point_above_chord():
    # chord (0, 2)-(2, 0) is at 1.0 when x = 1: (1, 1.5) lies above it and goes, (3, 0.5) is a lower-right corner
    assert lower_convex_hull([(1, 1.5), (0, 2), (2, 0), (3, 0.5)]) == [(0, 2), (2, 0), (3, 0.5)]
    # ...whereas (1, 0.5) lies below the chord and is a vertex
    assert lower_convex_hull([(0, 2), (1, 0.5), (2, 0)]) == [(0, 2), (1, 0.5), (2, 0)]
    assert lower_convex_hull(A) == A


def test_hull_collinear_and_duplicates():
    # all on y = 3 - x: only the two ends are corners; the interior points still interpolate to the same line
    pts = [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert lower_convex_hull(pts) == [(0, 3), (3, 0)]
    assert pretrain_loss_at(pts, 1.5) == approx(1.5)
    # a repeated ft_loss keeps its lowest pt_loss only; an exact duplicate counts once
    assert lower_convex_hull([(1, 3), (1, 2), (2, 1), (1, 2), (2, 1)]) == [(1, 2), (2, 1)]
    # a tie at the right end must not leave a vertical edge: (2, 1.5) is dropped in favour of (2, 1)
    assert lower_convex_hull([(0, 2), (2, 1.5), (2, 1)]) == [(0, 2), (2, 1)]


def test_single_point():
    assert lower_convex_hull([(2.0, 3.0)]) == [(2.0, 3.0)]
    assert frontier([(2.0, 3.0)]) == [(2.0, 3.0)]
    assert pretrain_loss_at([(2.0, 3.0)], 2.0) == 3.0
    assert pretrain_loss_at([(2.0, 3.0)], 5.0) == 3.0  # right of the frontier: held at its lowest pt_loss
    with pytest.raises(ValueError, match='below'):
        pretrain_loss_at([(2.0, 3.0)], 1.9)
    with pytest.raises(ValueError):
        lower_convex_hull([])


def test_frontier_cuts_rising_part_and_diverged_runs():
    # lower hull (0, 3), (1, 1), (2, 2): (2, 2) is beaten on both losses by (1, 1), so the frontier stops at (1, 1)
    pts = [(0, 3), (1, 1), (2, 2), (1.5, 4)]
    assert lower_convex_hull(pts) == [(0, 3), (1, 1), (2, 2)]
    assert frontier(pts) == [(0, 3), (1, 1)]
    assert frontier(frontier(pts)) == frontier(pts)
    assert pretrain_loss_at(pts, 1.5) == 1.0  # flat beyond (1, 1), not 1.5 on the rising edge
    # a diverged run (nan) is dropped, not an error; a sweep of only diverged runs is
    assert frontier([(0, 3), (math.nan, 1), (1, math.inf), (1, 1)]) == [(0, 3), (1, 1)]
    with pytest.raises(ValueError, match='finite'):
        frontier([(math.nan, math.nan)])


def test_interpolation():
    assert pretrain_loss_at(A, 2.2) == approx(3.3)  # at a vertex
    assert pretrain_loss_at(A, 2.1) == approx(3.4)  # halfway (2.0, 3.5)-(2.2, 3.3)
    assert pretrain_loss_at(A, 2.4) == approx(3.25)  # halfway (2.2, 3.3)-(2.6, 3.2)
    assert pretrain_loss_at(A, 2.0) == approx(3.5)  # left end: defined
    with pytest.raises(ValueError, match='below'):
        pretrain_loss_at(A, 1.99)
    with pytest.raises(ValueError):
        pretrain_loss_at(A, math.nan)


def test_matched_forgetting_threshold_rule():
    # best ft_losses: A 2.0, B 2.1 -> threshold 2.1; A's hull there 3.4, B's 3.2 (its first vertex)
    # F_A = 3.4 - 3.0 = 0.4, F_B = 3.2 - 3.0 = 0.2 -> B forgets (0.4 - 0.2) / 0.4 = 50% less
    res = matched_forgetting({'adamw': A, 'sam': B}, {'adamw': 3.0, 'sam': 3.0})
    assert res['threshold'] == 2.1
    assert res['pt_loss_at_threshold'] == approx({'adamw': 3.4, 'sam': 3.2})
    assert res['forgetting'] == approx({'adamw': 0.4, 'sam': 0.2})
    assert percent_less_forgetting(res['forgetting']['adamw'], res['forgetting']['sam']) == approx(50.0)
    # threshold right of A's whole frontier: A (1, 2), (2, 1) base 0.5; B (3, 1.5), (4, 1.2) base 1.0
    # threshold 3; A held at 1.0 -> F_A 0.5; B at its first vertex 1.5 -> F_B 0.5
    res = matched_forgetting({'a': [(1, 2), (2, 1)], 'b': [(3, 1.5), (4, 1.2)]}, {'a': 0.5, 'b': 1.0})
    assert res['threshold'] == 3 and res['forgetting'] == approx({'a': 0.5, 'b': 0.5})
    with pytest.raises(ValueError, match='base pt_loss'):
        matched_forgetting({'a': A, 'b': B}, {'a': 3.0})


def test_percent_quantization_score_drop():
    assert percent_less_forgetting(0.4, 0.1) == approx(75.0)  # positive: less forgetting
    assert percent_less_forgetting(0.2, 0.4) == approx(-100.0)  # negative: twice the forgetting
    assert math.isnan(percent_less_forgetting(0.0, 0.1))
    assert math.isnan(percent_less_forgetting(-0.1, 0.1))
    assert quantization_forgetting(3.0, 3.25) == approx(0.25)
    assert score_drop(50.0, 40.0) == approx(20.0)  # 100 * (50 - 40) / 50
    assert score_drop(50.0, 55.0) == approx(-10.0)  # SAM base above the AdamW base: a negative drop
    assert math.isnan(score_drop(0.0, 1.0))


# Frontiers with a known answer: forgetting F(x) = 0.1 / (x - 2.4) for AdamW, steep near the top like the CPU
# frontiers, and exactly 0.8 F(x) for the other model, so it forgets 20% less at every fine-tuning loss. The two
# sweeps reach slightly different fine-tuning losses, as two base models do; AdamW's grid has a gap near its top.
def known_sweep(xs, scale, base=3.0):
    return [(x, base + scale * 0.1 / (x - 2.4)) for x in xs]


KNOWN_ADAMW = known_sweep([3.7, 3.0, 2.7, 2.52], 1.0)
KNOWN_OTHER = known_sweep([3.72, 3.02, 2.8, 2.58, 2.53], 0.8)


def both_figures(adamw, other):
    f = matched_forgetting({'a': adamw, 'o': other}, {'a': 3.0, 'o': 3.0})['forgetting']
    return percent_less_forgetting(f['a'], f['o']), area_percent_less(adamw, other, 3.0, 3.0)


def test_area_figure_is_exact_for_proportional_piecewise_linear_frontiers():
    # other's forgetting is half the baseline's at each of the baseline's own vertices: 50% less over any range
    adamw = [(2.5, 4.0), (2.8, 3.5), (3.4, 3.2)]
    other = [(x, 3.0 + 0.5 * (y - 3.0)) for x, y in adamw]
    assert area_percent_less(adamw, other, 3.0, 3.0) == approx(50.0)
    # different base losses: forgetting is measured from each model's own base
    assert area_percent_less(adamw, [(x, y + 0.2 - 0.5 * (y - 3.0)) for x, y in adamw], 3.0, 3.2) == approx(50.0)
    assert math.isnan(area_percent_less([(2.0, 4.0)], [(2.5, 3.0)], 3.0, 3.0))  # no shared range


def test_one_learning_rate_near_the_top_moves_the_area_figure_much_less():
    # the known answer is 20% less at every fine-tuning loss
    matched, area = both_figures(KNOWN_ADAMW, KNOWN_OTHER)
    assert area == approx(20, abs=4)
    # without AdamW's best run the matched loss moves to 2.7, where the other model's frontier interpolates
    # across a gap: the paper's figure falls from 24% to 7%; the area figure stays near the answer
    matched_without, area_without = both_figures(KNOWN_ADAMW[:-1], KNOWN_OTHER)
    assert matched - matched_without > 10
    assert area_without == approx(20, abs=4)
    # an extra run near the top (the other model at 2.51) likewise
    matched_with, area_with = both_figures(KNOWN_ADAMW, KNOWN_OTHER + known_sweep([2.51], 0.8))
    for m, a in ((matched_without, area_without), (matched_with, area_with)):
        assert abs(a - area) < abs(m - matched) / 5


def test_bootstrap_intervals():
    # one seed, two tasks, the known sweeps on the same five-rate grid: the interval holds the estimate
    adamw = known_sweep([3.7, 3.0, 2.7, 2.55, 2.52], 1.0)
    runs = {task: {'adamw': (adamw, 3.0), 'sam': (KNOWN_OTHER, 3.0)} for task in ('gsm8k', 'tulu')}
    result = bootstrap([runs], lambda s: sft_figures(s, 'adamw', 'sam'), resample_runs, n_boot=200)
    (estimate, low, high) = result['mean']
    assert estimate == approx(sft_figures([runs], 'adamw', 'sam')['gsm8k'])
    for i in (0, 1):
        assert low[i] <= estimate[i] <= high[i]
    assert verdict(low[1], high[1]) == 'less forgetting'  # the area figure: 20% less, clearly
    # identical models: every replicate says 0
    same = {'gsm8k': {'adamw': (adamw, 3.0), 'sam': (adamw, 3.0)}}
    assert bootstrap([same], lambda s: sft_figures(s, 'adamw', 'sam'), resample_runs, n_boot=50)['mean'] == \
        ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    assert verdict(-1.0, 2.0) == 'no detectable difference' and verdict(-3.0, -1.0) == 'more forgetting'


def test_quantization_interval_pairs_the_batches():
    # the other model's loss rises by exactly half the baseline's on every batch: every replicate gives 50%,
    # however different the batches are; unpaired resampling would scatter it
    rng = np.random.default_rng(0)
    increases = rng.uniform(0.01, 0.2, size=16)
    seeds = [{'adamw': increases, 'sam': increases / 2}]
    estimate, low, high = bootstrap(seeds, lambda s: quantization_figures(s, 'adamw', 'sam'), resample_batches,
                                    n_boot=100)['%']
    assert (estimate, low, high) == approx((50.0, 50.0, 50.0))
    # with seeds, the seeds are resampled too: two seeds at 50% and 10% less give an interval spanning both
    seeds.append({'adamw': increases, 'sam': increases * 0.9})
    estimate, low, high = bootstrap(seeds, lambda s: quantization_figures(s, 'adamw', 'sam'), resample_batches,
                                    n_boot=200)['%']
    assert estimate == approx(30.0) and low == approx(10.0) and high == approx(50.0)


def write_results(tmp_path, runs):
    paths = []
    for i, (task, init_from, lr, ft, pt, base_pt) in enumerate(runs):
        result = {'task': task, 'init_from': init_from, 'learning_rate': lr, 'base': {'ft_val_loss': 4.0,
                  'pt_val_loss': base_pt}, 'final': {'ft_val_loss': ft, 'pt_val_loss': pt}}
        path = tmp_path / f'run{i}.json'
        path.write_text(json.dumps(result))
        paths.append(str(path))
    return paths


def analysis(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'analysis.py'), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


RUNS = [('gsm8k', 'out/adamw_60m', lr, ft, pt, 3.0) for lr, (ft, pt) in zip([3e-4, 1e-4, 3e-5], A)] + \
       [('gsm8k', 'out/sam_60m', lr, ft, pt, 3.0) for lr, (ft, pt) in zip([3e-4, 1e-4], B)]


def test_cli(tmp_path):
    result = analysis(*write_results(tmp_path, RUNS))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'task gsm8k: 2 base models, threshold ft_loss 2.1000, baseline out/adamw_60m' in out
    assert '3.00e-04: (2.0000, 3.5000)  1.00e-04: (2.2000, 3.3000)  3.00e-05: (2.6000, 3.2000)' in out
    assert 'pt_loss at threshold 3.4000, forgetting 0.4000 (baseline)' in out
    assert 'pt_loss at threshold 3.2000, forgetting 0.2000 50.0% less forgetting than baseline' in out
    # the other way round: A forgets (0.2 - 0.4) / 0.2 = 100% more
    assert '-100.0% less forgetting' in analysis(*write_results(tmp_path, RUNS), '--baseline=SAM').stdout


@pytest.mark.parametrize('bad, message', [
    ('{"task": ', 'cannot read JSON'),
    ('{"task": "gsm8k", "init_from": "x", "learning_rate": 1e-4, "base": {"pt_val_loss": 3.0}}', "'final.ft_val_loss'"),
    ('{"task": "gsm8k", "init_from": "x", "learning_rate": "fast"}', "'learning_rate' must be a number"),
    (None, 'No such file'),
])
def test_cli_bad_file(tmp_path, bad, message):
    path = tmp_path / 'bad.json'
    if bad is not None:
        path.write_text(bad)
    result = analysis(*write_results(tmp_path, RUNS), str(path))
    assert result.returncode != 0 and result.stdout == ''
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize('args, message', [
    (['--baseline=lion'], 'matched 0'),
    (['--baseline=60m'], 'matched 2'),
    (['--frontier=yes'], 'unknown option'),
])
def test_cli_bad_usage(tmp_path, args, message):
    result = analysis(*write_results(tmp_path, RUNS), *args)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_cli_one_base_model(tmp_path):
    result = analysis(*write_results(tmp_path, RUNS[:3]))
    assert result.returncode != 0 and 'only one base model' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
