"""
Forgetting as a benchmark-score drop for report.py (experiment.py lm_eval_tasks; the paper's 1B measure): the
lm-evaluation-harness scores of the benchmark/ stages, the fine-tuned models compared at matched fine-tuning loss
(analysis.matched_score_drop), and the report's section on them.
"""
import os

from analysis import matched_score_drop, percent_less_forgetting, score_drop
from report import comparison_pairs, comparison_table, read_json


def collect_benchmarks(out_dir, stages, config):
    """Forgetting as a benchmark-score drop, from the benchmark/ stages: {scores: {checkpoint: mean score},
    sft: {task: {seed: entry}}, quantization: {method: {seed: entry}}}, entries shaped as report.collect()'s;
    forgetting = % score drop against B, the score of the pair's baseline base model."""
    scores = {}
    for stage in stages.values():
        if stage['name'].startswith('benchmark/'):
            for path, evaluation in (read_json(stage['product']) or {}).items():
                if (evaluation.get('lm_eval') or {}).get('score') is not None:
                    scores[path] = evaluation['lm_eval']['score']
    results = {'scores': scores, 'sft': {}, 'quantization': {}}
    sweeps = {}  # (task, seed) -> base -> [(ft_loss, score)]
    for stage in stages.values():
        result = read_json(stage['product']) if stage['kind'] == 'finetune' else None
        score = scores.get(os.path.join(stage['dir'], 'ckpt.pt'))
        if result and result.get('final') and score is not None:
            base, seed = stage['name'].split('/')[1].rsplit('_s', 1)
            point = (result['final']['ft_val_loss'], score)
            sweeps.setdefault((result['task'], seed), {}).setdefault(base, []).append(point)
    for b, a in comparison_pairs(config).items():  # each base model against its baseline alone, as collect() does
        for seed in map(str, config['seeds']):
            base_score = scores.get(os.path.join(out_dir, 'pretrain', f'{a}_s{seed}', 'ckpt.pt'))
            if base_score is None or not base_score > 0:
                continue
            for task in config['tasks']:
                models = sweeps.get((task, seed), {})
                if a in models and b in models:
                    matched = matched_score_drop({a: models[a], b: models[b]}, base_score, a)
                    entry = results['sft'].setdefault(task, {}).setdefault(seed, {
                        'forgetting': {}, 'baseline_forgetting': {}, 'percent_less': {}, 'threshold': {}})
                    entry['forgetting'][b] = matched['forgetting'][b]
                    entry['baseline_forgetting'][b] = matched['forgetting'][a]
                    entry['percent_less'][b], entry['threshold'][b] = matched['percent_less'][b], matched['threshold']
            for method in config['quantize_methods']:
                quantized = {m: scores.get(os.path.join(out_dir, 'quantize', f'{m}_s{seed}_{method}', 'ckpt.pt'))
                             for m in (a, b)}
                if None not in quantized.values():
                    drop = {m: score_drop(base_score, s) for m, s in quantized.items()}
                    entry = results['quantization'].setdefault(method, {}).setdefault(seed, {
                        'forgetting': {}, 'baseline_forgetting': {}, 'percent_less': {}})
                    entry['forgetting'][b], entry['baseline_forgetting'][b] = drop[b], drop[a]
                    entry['percent_less'][b] = percent_less_forgetting(drop[a], drop[b])
    return results


def benchmark_lines(results, config, others):
    """The report's section on forgetting as a benchmark-score drop (collect_benchmarks)."""
    lines = ['', '## Forgetting as a benchmark-score drop', '',
             f"Mean score over `{config['lm_eval_tasks']}` (lm-evaluation-harness via evaluate.py). Score drop = "
             f"100 (B - score) / B, B = the score of the pair's baseline base model (analysis.score_drop); fine-tuned "
             f"models compared at matched fine-tuning loss on the (fine-tuning loss, score drop) frontiers. % less "
             f"score drop than the baseline: mean ± std over seeds [per-seed values].", '']
    lines += comparison_table('task', {t: results['sft'].get(t, {}) for t in config['tasks']}, others)
    lines += ['', 'After quantization (score drop of the quantized model):', '']
    lines += comparison_table('method', {m: results['quantization'].get(m, {}) for m in config['quantize_methods']},
                              others)
    return lines
