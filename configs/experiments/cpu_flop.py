# Forgetting per FLOP (docs/forgetting_per_flop.md): does a cheaper SAM keep its benefit, is SAM better than spending
# its compute on AdamW, and is a pretraining-time fix better than the usual fine-tuning-time ones? cpu_seeds.py (the
# default experiment with 3 seeds; same out_dir, so its 4 base models are reused) plus cheaper SAM
# variants, AdamW at SAM's compute (2x the tokens) and three fine-tuning-time mitigations of the AdamW base. The
# report's "Forgetting per FLOP" table and flops.png set % less forgetting against training FLOPs counted from the
# runs. Not a paper setting; 2.4 h on 2 cores (measured; README, "Forgetting per FLOP"):
#
#   nohup python experiment.py configs/experiments/cpu_flop.py > flop.log 2>&1 &
from configs.experiments.cpu_seeds import *

_model = 'configs/cpu_small.py'
# the default's pretrain_args, moved into each base: the same stages. (The committed results, docs/flop_*, were run
# before pretraining was compiled: a rerun differs by float rounding, as the default did; docs/speed.md.)
_budget = '--max_iters=1000 --eval_interval=250 --compile=True'
pretrain_args = ''
bases = {
    # the default experiment's four base models
    'adamw': f'{_model} {_budget}',
    'sam': f'{_model} --optimizer=sam --sam_rho=0.05 {_budget}',
    'large_lr': f'{_model} --learning_rate=1e-2 {_budget}',
    'short_anneal': f'{_model} --lr_schedule=wsd --anneal_fraction=0.05 {_budget}',
    # cheaper SAM: every 2nd / 4th step (AdamW between), only in the final 10% of the steps, and Momentum-SAM
    # (perturbed along AdamW's first moment; rho 0.3 is the authors' SGD default, 6x SAM's: not tuned here)
    'sam_every2': f'{_model} --optimizer=sam --sam_rho=0.05 --sam_interval=2 {_budget}',
    'sam_every4': f'{_model} --optimizer=sam --sam_rho=0.05 --sam_interval=4 {_budget}',
    'sam_final10': f'{_model} --optimizer=sam --sam_rho=0.05 --sam_start_fraction=0.9 {_budget}',
    'msam': f'{_model} --optimizer=msam --sam_rho=0.3 {_budget}',
    # the compute-matched baseline: AdamW on 2x the tokens (2000 steps, its cosine stretched over them)
    'adamw_2x': f'{_model} --max_iters=2000 --eval_interval=500 --compile=True',
}
# fine-tuning-time mitigations of the AdamW base, over the same tasks and learning-rate sweep (rows adamw+<name>)
# (replay's longer batches and LoRA's adapters are not the model the stage server compiles once: each of their runs
# would compile its own, which costs more than it saves, so they run eagerly)
finetune_mitigations = {
    # 1 pretraining sequence per 3 task sequences (+33% tokens)
    'replay': ('adamw', '--replay_fraction=0.25 --compile=False'),
    'l2init': ('adamw', '--l2_init=0.01'),  # not tuned
    'lora': ('adamw', '--lora_rank=8 --lora_alpha=16 --compile=False'),  # attention and MLP matrices, merged back
    # the same adapters at 10x the scale: under Adam, about the rank-8 run at 10x the learning rate (LoRA usually wants
    # a larger one than full fine-tuning), so that the same sweep reaches LoRA's best learning rates too
    'lora_x10': ('adamw', '--lora_rank=8 --lora_alpha=160 --compile=False'),
}
