"""Forgetting as a benchmark-score drop (the paper's 1B measure): analysis.matched_score_drop, by hand."""
import pytest

from analysis import matched_score_drop


def test_score_drop_frontiers_compared_at_matched_fine_tuning_loss():
    # B = 50. adamw's runs drop to 40 and 48 (20% and 4%), sam's to 45 and 49 (10% and 2%): at the matched loss 1.0
    # (both reach it) adamw's frontier reads 20, sam's 10: 50% less score drop
    sweeps = {'adamw': [(1.0, 40.0), (2.0, 48.0)], 'sam': [(1.0, 45.0), (2.0, 49.0), (3.0, 30.0)]}
    res = matched_score_drop(sweeps, 50.0, 'adamw')
    assert res['threshold'] == 1.0
    assert res['forgetting'] == pytest.approx({'adamw': 20.0, 'sam': 10.0})
    assert res['percent_less'] == pytest.approx({'sam': 50.0})
    assert res['frontier']['sam'] == [(1.0, 10.0), (2.0, 2.0)]  # the (3.0, 40%) run is beaten on both axes
    # sam learns less at best (1.5): the threshold moves there and adamw's frontier is interpolated (20 -> 4: 12)
    res = matched_score_drop({'adamw': sweeps['adamw'], 'sam': [(1.5, 47.0)]}, 50.0, 'adamw')
    assert res['threshold'] == 1.5
    assert res['forgetting'] == pytest.approx({'adamw': 12.0, 'sam': 6.0})
    assert res['percent_less']['sam'] == pytest.approx(50.0)


def test_broken_baseline_score_is_refused():
    with pytest.raises(ValueError):  # B <= 0: score_drop is nan, so there is no frontier to read
        matched_score_drop({'adamw': [(1.0, 40.0)], 'sam': [(1.0, 45.0)]}, 0.0, 'adamw')


def test_report_reads_score_drops_from_benchmark_stages(tmp_path):
    """benchmark_scores.collect_benchmarks on stage outputs laid out as experiment.py lays them out (hand-made
    numbers)."""
    import json
    import os
    from benchmark_scores import benchmark_lines, collect_benchmarks
    out = str(tmp_path)
    stages = {}

    def stage(name, kind, product, content):
        directory = os.path.join(out, name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, product), 'w') as f:
            json.dump(content, f)
        stages[name] = {'name': name, 'kind': kind, 'dir': directory, 'product': os.path.join(directory, product)}

    def scored(*pairs):
        return {path: {'pretrain_val_loss': 3.0, 'lm_eval': {'score': s}} for path, s in pairs}
    ckpt = {name: os.path.join(out, name, 'ckpt.pt') for name in
            ('pretrain/adamw_s1', 'pretrain/sam_s1', 'quantize/adamw_s1_nf4', 'quantize/sam_s1_nf4')}
    for base, runs in (('adamw', [(1.0, 40.0), (2.0, 48.0)]), ('sam', [(1.0, 45.0), (2.0, 49.0)])):
        for i, (ft, s) in enumerate(runs):
            name = f'finetune/{base}_s1/t_lr{i}'
            stage(name, 'finetune', 'result.json', {'task': 't', 'final': {'ft_val_loss': ft, 'pt_val_loss': 4.0}})
            stage(f'benchmark/{base}_s1/t_lr{i}', 'evaluate', 'eval.json', scored((os.path.join(out, name, 'ckpt.pt'), s)))
    stage('benchmark/adamw_s1', 'evaluate', 'eval.json', scored((ckpt['pretrain/adamw_s1'], 50.0)))
    stage('benchmark/sam_s1', 'evaluate', 'eval.json', scored((ckpt['pretrain/sam_s1'], 51.0)))
    stage('benchmark/adamw_s1_quantized', 'evaluate', 'eval.json', scored((ckpt['quantize/adamw_s1_nf4'], 45.0)))
    stage('benchmark/sam_s1_quantized', 'evaluate', 'eval.json', scored((ckpt['quantize/sam_s1_nf4'], 48.0)))
    config = {'bases': {'adamw': '', 'sam': ''}, 'seeds': (1,), 'baseline': 'adamw', 'tasks': ('t',),
              'quantize_methods': ('nf4',), 'lm_eval_tasks': 'x'}
    results = collect_benchmarks(out, stages, config)
    entry = results['sft']['t']['1']
    assert entry['baseline_forgetting']['sam'] == pytest.approx(20.0) and entry['forgetting']['sam'] == pytest.approx(10.0)
    assert entry['percent_less']['sam'] == pytest.approx(50.0)
    q = results['quantization']['nf4']['1']  # drops 10% (adamw) and 4% (sam) below B = 50
    assert q['baseline_forgetting']['sam'] == pytest.approx(10.0) and q['forgetting']['sam'] == pytest.approx(4.0)
    assert q['percent_less']['sam'] == pytest.approx(60.0)
    lines = '\n'.join(benchmark_lines(results, config, ['sam']))
    assert '| t | 20.0000 | 10.0000 | 50.0' in lines and '| nf4 | 10.0000 | 4.0000 | 60.0' in lines
