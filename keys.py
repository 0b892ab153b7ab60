"""
Every config key of every script: its type and the values it may take, declared once.

load_config(defaults, argv, keys.PRETRAIN) checks each key against its declaration before the script does any work,
and stops with one line naming the key (`n_head must be an int >= 1, got 0`). A script whose defaults hold a key
declared nowhere does not start. To add a key: the variable in the script's config block, and one line in its
table below, e.g.  'warmup_iters': Key(int, min=0),

    python keys.py    # the tables as markdown (docs/configs.md holds them; a test keeps the two equal)
"""
import math
import re
from dataclasses import dataclass

from config import check


@dataclass(frozen=True)
class Key:
    type: type  # bool | int | float | str | tuple | dict; an int is accepted for a float, a list for a tuple
    min: float = None  # numbers (a tuple: each of its numbers) must be >= min, <= max, > above, < below
    max: float = None
    above: float = None
    below: float = None
    also: tuple = ()  # values allowed outside that range (-1 = all, 0 = the checkpoint's, ...)
    choices: tuple = None  # str (a tuple: each of its items) must be one of these
    item: type = None  # tuple: the type of its items
    pattern: str = None  # str must match this regular expression in full
    required: bool = False  # str / tuple: must not be empty
    means: str = ''  # what the allowed values are, in words, where the fields above do not say it well

    def allowed(self):
        """The allowed values in words: 'an int >= 1', "one of 'pre', 'post'", ..."""
        if self.means:
            return self.means
        if self.type in (bool, dict):
            return {bool: 'True or False', dict: 'a dict'}[self.type]
        kind = self.item if self.type is tuple else self.type
        if self.choices:
            text = 'one of ' + ', '.join(map(repr, self.choices))
        elif kind is str:
            text = 'a non-empty string' if self.required else 'a string'
        else:
            bounds = [f'{op} {_number(v)}' for op, v in (('>=', self.min), ('>', self.above), ('<=', self.max),
                                                         ('<', self.below)) if v is not None]
            text = ' '.join([{int: 'an int', float: 'a number'}[kind], ' and '.join(bounds)]).strip()
            text = ''.join(f'{v!r} or ' for v in self.also) + text
        if self.type is tuple:
            return f"a {'non-empty ' if self.required else ''}tuple, each item {text}"
        return text

    def problem(self, value):
        """The allowed values in words if value (coerced) is not one of them; None if it is."""
        items = value if self.type is tuple else (value,)
        if self.required and len(value) == 0 or not all(self._item_ok(v) for v in items):
            return self.allowed()
        return None

    def _item_ok(self, v):
        if v in self.also and type(v) is not bool:
            return True
        if self.choices is not None and v not in self.choices:
            return False
        if isinstance(v, str):
            return ((not self.required or v != '')
                    and (self.pattern is None or re.fullmatch(self.pattern, v) is not None))
        if type(v) in (int, float):
            return (math.isfinite(v) and (self.min is None or v >= self.min) and (self.max is None or v <= self.max)
                    and (self.above is None or v > self.above) and (self.below is None or v < self.below))
        return True

    def coerce(self, value):
        """value as this key's type (int -> float, list -> tuple), or None if it has another type."""
        if self.type is float and type(value) is int:
            return float(value)
        if self.type is tuple and type(value) in (list, tuple):
            value = tuple(float(v) if self.item is float and type(v) is int else v for v in value)
            return value if self.item is None or all(type(v) is self.item for v in value) else None
        return value if type(value) is self.type else None


def _number(v):
    return f'2**{int(math.log2(v + 1))}-1' if v > 2**20 and math.log2(v + 1).is_integer() else repr(v)


# shared by several scripts -----------------------------------------------------------------------------------------
SEED = Key(int, min=0, max=2**32 - 1)  # numpy's generators take no more
DEVICE = Key(str, pattern=r'auto|cpu|cuda(:\d+)?', means="'auto', 'cpu', 'cuda' or 'cuda:N'")
DTYPE = Key(str, choices=('auto', 'bfloat16', 'float32'))
EVAL_DTYPE = Key(str, choices=('float32', 'bfloat16'))
POSITIVE = Key(int, min=1)
COUNT = Key(int, min=0)
FRACTION = Key(float, min=0, max=1)
PATH = Key(str, required=True, means='a non-empty path')
TEXT = Key(str)  # any string, '' included
FLAG = Key(bool)

MODEL = {  # model.py's GPTConfig (vocab_size and block_size are declared per script)
    'n_layer': POSITIVE, 'n_head': POSITIVE, 'n_embd': POSITIVE,
    'n_kv_head': Key(int, min=0, means='0 (= n_head) or an int >= 1 that divides n_head'),
    'intermediate_size': Key(int, min=0, means='0 (= 4 * n_embd) or an int >= 1'),
    'rope_theta': Key(float, above=0), 'norm_eps': Key(float, above=0), 'qk_norm': FLAG,
    'norm_position': Key(str, choices=('pre', 'post')), 'init_std': Key(float, above=0),
}
ADAMW = {
    'learning_rate': Key(float, above=0), 'weight_decay': Key(float, min=0), 'beta1': Key(float, min=0, below=1),
    'beta2': Key(float, min=0, below=1), 'eps': Key(float, above=0), 'grad_clip': Key(float, min=0),
}
TRACKING = {  # tracking.py: W&B and TensorBoard mirrors of log.jsonl
    'wandb_log': FLAG, 'wandb_project': PATH, 'wandb_run_name': TEXT, 'wandb_group': TEXT, 'tensorboard_dir': TEXT,
}
TRAINING = {  # what pretrain.py and finetune.py share besides the optimizer
    'out_dir': PATH, 'overwrite': FLAG, 'eval_interval': POSITIVE, 'eval_iters': POSITIVE, 'log_interval': POSITIVE,
    'max_bad_steps': COUNT, 'batch_size': POSITIVE, 'gradient_accumulation_steps': POSITIVE, 'min_lr_ratio': FRACTION,
    'seed': SEED, 'device': DEVICE, 'dtype': DTYPE, 'compile': FLAG, **TRACKING,
}

# one table per script ---------------------------------------------------------------------------------------------
PRETRAIN = {
    **TRAINING, **MODEL, **ADAMW,
    'init_from': Key(str, required=True, means="'scratch', 'resume', a checkpoint path, or hf:NAME"),
    'hf_revision': TEXT, 'keep_optimizer_state': FLAG, 'data_root': PATH, 'dataset': PATH,
    'max_train_tokens': Key(int, min=0, means='0 (= all) or an int >= 1'),
    'stop_at_iter': Key(int, min=0, also=(-1,)), 'block_size': POSITIVE,
    'vocab_size': Key(int, min=0, means="0 (= the dataset's, rounded up to a multiple of 128) or an int >= 1"),
    'z_loss': Key(float, min=0), 'optimizer': Key(str, choices=('adamw', 'sam', 'msam')),
    'decay_embeddings': FLAG, 'sam_rho': Key(float, min=0), 'sam_adaptive': FLAG, 'sam_sync_ascent': FLAG,
    'sam_interval': POSITIVE, 'looksam_alpha': Key(float, min=0),
    'sam_start_fraction': FRACTION, 'sam_end_fraction': FRACTION, 'max_iters': POSITIVE, 'warmup_iters': COUNT,
    'lr_schedule': Key(str, choices=('cosine', 'wsd', 'constant')), 'anneal_fraction': Key(float, above=0, max=1),
}
TASK_SOURCE = Key(str, choices=('offline', 'hub'))
FINETUNE = {
    **TRAINING, **ADAMW,
    'init_from': Key(str, required=True, means="the base checkpoint's path, or 'resume'"),
    'hf_revision': TEXT, 'task': Key(str, required=True, means='a task name or the path of a .jsonl file'),
    'source': TASK_SOURCE,
    'max_tokens': POSITIVE, 'val_tokens': POSITIVE, 'pretrain_data': TEXT,
    'block_size': Key(int, min=0, means="0 (= the base model's) or an int >= 1"),
    'warmup_fraction': Key(float, min=0, below=1),
    'cache_dir': Key(str, means="'' (no cache) or a directory shared by a sweep's runs"),
    'replay_fraction': Key(float, min=0, below=1), 'l2_init': Key(float, min=0), 'ewc_sequences': COUNT,
    'lora_rank': COUNT, 'lora_alpha': Key(float, above=0),
}
QUANTIZE = {
    'init_from': PATH, 'hf_revision': TEXT, 'pretrain_data': TEXT, 'out_dir': PATH, 'overwrite': FLAG,
    'method': Key(str, choices=('nf4', 'fp4', 'int8', 'rtn')),
    'blocksize': POSITIVE, 'double_quant': FLAG, 'bits': Key(int, min=2, max=8),
    'group_size': Key(int, min=1, also=(-1,)), 'symmetric': FLAG, 'quantize_embeddings': FLAG, 'quantize_head': FLAG,
    'save_packed': FLAG,
}
EVALUATE = {
    'checkpoints': Key(str, required=True, means='comma-separated checkpoint paths'), 'hf_revision': TEXT,
    'out': PATH, 'overwrite': FLAG,
    'pretrain_data': TEXT, 'eval_iters': POSITIVE, 'batch_size': POSITIVE,
    'block_size': Key(int, min=0, means="0 (= the first checkpoint's) or an int >= 1"), 'tasks': TEXT,
    'val_tokens': POSITIVE, 'source': TASK_SOURCE, 'sharpness': TEXT, 'sharpness_batches': POSITIVE,
    'noise_sigmas': Key(tuple, item=float, min=0, required=True), 'noise_seeds': POSITIVE,
    'noise_scaling': Key(str, choices=('absolute', 'relative')), 'hessian_iters': POSITIVE,
    'hessian_tol': Key(float, min=0), 'trace_samples': POSITIVE, 'sam_rho': Key(float, above=0), 'seed': SEED,
    'device': DEVICE, 'dtype': EVAL_DTYPE,
    'lm_eval_tasks': TEXT, 'lm_eval_num_fewshot': Key(int, min=0, also=(-1,)), 'lm_eval_limit': COUNT,
    'lm_eval_batch_size': POSITIVE, 'lm_eval_include_path': TEXT, 'lm_eval_builtin_tasks': FLAG,
    'lm_eval_score_metrics': Key(tuple, item=str, required=True),
}
PREPARE = {
    'dataset': Key(str, pattern=r'(?!\.\.?$)[^/]+', means='a plain directory name'), 'data_root': PATH,
    'source': Key(str, required=True, means='wiki_en, wiki_fr, wiki_es, hf:NAME, or a file, directory or glob'),
    'hf_config': TEXT, 'hf_split': PATH, 'text_field': PATH, 'max_docs': Key(int, min=1, also=(-1,)),
    'max_tokens': Key(int, min=1, also=(-1,)),
    'tokenizer': Key(str, required=True, means="'bpe', a tiktoken encoding name, or a prepared dataset directory"),
    'vocab_size': Key(int, min=258, max=2**32 - 1), 'val_fraction': Key(float, above=0, below=1), 'seed': SEED,
    'overwrite': FLAG,
}
EXPORT_HF = {
    'init_from': PATH, 'out_dir': PATH, 'overwrite': FLAG, 'dtype': EVAL_DTYPE, 'tokenizer': TEXT, 'verify': FLAG,
}
IMPORT_HF = {
    'init_from': Key(str, required=True, means='hf:NAME or a Hugging Face directory'), 'hf_revision': TEXT,
    'out_dir': PATH, 'overwrite': FLAG, 'data_root': PATH, 'dataset': PATH,
    'block_size': Key(int, min=0, means="0 (= the model's max_position_embeddings) or an int >= 1"),
}
BENCHMARK = {
    'reference': FLAG, 'sam': FLAG, 'rounds': POSITIVE, 'steps': POSITIVE, 'warmup_steps': COUNT,
    'threads': Key(int, min=0, means="0 (= torch's default) or an int >= 1"), 'seed': SEED, 'experiment': FLAG,
}
MEMORY_BUDGET = {
    'n_layer': POSITIVE, 'n_head': POSITIVE, 'n_embd': POSITIVE, 'intermediate_size': MODEL['intermediate_size'],
    'vocab_size': POSITIVE, 'block_size': POSITIVE, 'batch_sizes': Key(tuple, item=int, min=1, required=True),
    'gpu_gib': Key(float, above=0), 'measure_widths': Key(tuple, item=int, min=1, required=True),
    'measure_heads': POSITIVE, 'measure_block': POSITIVE, 'seed': SEED,
}
EXPERIMENT = {
    'out_dir': PATH, 'data_root': PATH, 'dataset': PREPARE['dataset'], 'prepare_args': TEXT,
    'bases': Key(dict, means='a dict: base model name -> pretrain.py arguments'), 'pretrain_args': TEXT,
    'baseline': PATH, 'comparisons': Key(dict, means='a dict: base model -> the base model it is compared with'),
    'seeds': Key(tuple, item=int, min=0, max=2**32 - 1, required=True),
    'tasks': Key(tuple, item=str, required=True),
    'finetune_config': Key(str, pattern=r'[^{}]*(\{task\}[^{}]*)*', required=True,
                           means="a config path, '{task}' standing for the task name"),
    'learning_rates': Key(tuple, item=float, above=0, required=True),
    'task_learning_rates': Key(dict, means='a dict: task -> tuple of learning rates'), 'finetune_args': TEXT,
    'quantize_methods': Key(tuple, item=str, choices=QUANTIZE['method'].choices), 'quantize_args': TEXT,
    'sharpness': TEXT, 'evaluate_args': TEXT, 'jobs': COUNT, 'multi_gpu': Key(str, choices=('torchrun', 'spread')),
    'finetune_mitigations': Key(dict, means='a dict: name -> (base model, finetune.py arguments)'),
    'stage_server': FLAG, 'dry_run': FLAG, 'report_only': FLAG, 'lm_eval_tasks': TEXT, 'lm_eval_args': TEXT, 'wandb_log': FLAG,
    'wandb_project': PATH, 'tensorboard': FLAG,
}
GPU_CHECK = {
    'out': PATH, 'device': DEVICE, 'sizes': Key(tuple, item=str, choices=('20m', '60m', '150m'), required=True),
    'tiny': FLAG, 'batch_size': Key(int, min=0, means="0 (= each size's configured micro-batch) or an int >= 1"),
    'steps': POSITIVE, 'warmup_steps': COUNT, 'compile': FLAG, 'compile_backend': PATH, 'check_steps': Key(int, min=2),
    'bf16_tolerance': Key(float, above=0), 'seed': SEED,
}
SCRIPTS = {'pretrain.py': PRETRAIN, 'finetune.py': FINETUNE, 'quantize.py': QUANTIZE, 'evaluate.py': EVALUATE,
           'prepare.py': PREPARE, 'export_hf.py': EXPORT_HF, 'import_hf.py': IMPORT_HF, 'benchmark.py': BENCHMARK,
           'memory_budget.py': MEMORY_BUDGET, 'experiment.py': EXPERIMENT, 'gpu_check.py': GPU_CHECK}


def check_model_shape(n_embd, n_head, n_kv_head=0):
    """Refuse, in one line before any work, the shapes model.py's attention cannot build (it asserts the same)."""
    check(n_embd % n_head == 0 and (n_embd // n_head) % 2 == 0,
          f"n_embd ({n_embd}) / n_head ({n_head}) must be an even integer (the rotary head size)")
    check(not n_kv_head or n_head % n_kv_head == 0, f"n_kv_head ({n_kv_head}) must divide n_head ({n_head})")


def markdown():
    """Every script's keys and their allowed values, as markdown tables."""
    lines = []
    for script, table in SCRIPTS.items():
        lines += [f'### {script} ({len(table)} keys)', '', '| key | type | allowed |', '|---|---|---|']
        lines += [f'| `{name}` | {key.type.__name__} | {key.allowed()} |' for name, key in table.items()]
        lines.append('')
    return '\n'.join(lines)


if __name__ == '__main__':
    print(markdown())
