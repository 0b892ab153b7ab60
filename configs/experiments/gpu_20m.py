# The paper's small-model comparison at 20M (d 256, 8 layers): AdamW vs SAM vs large peak LR vs short anneal,
# fine-tuned on the five datasets (hub) at a learning-rate sweep, quantized to 4 and 8 bits. GPU machine, internet.
#
#   python experiment.py configs/experiments/gpu_20m.py                 # 8 GPUs: each stage runs under torchrun
#   python experiment.py configs/experiments/gpu_20m.py --multi_gpu=spread --jobs=0   # or one stage per GPU
#
# Token budget: the pretrain configs default to the largest budget, 64B (244,141 steps of 262,144 tokens). The paper
# sweeps 4, 8, 16, 32, 64B; e.g. 4B with its tuned lr:
#   --pretrain_args='--max_iters=15259 --learning_rate=3e-3' (then large_lr's 3e-3 is no larger: raise it, e.g. 1e-2)
# Estimated cost (README, "GPU presets"): about 13 H100-hours per AdamW-cost pretraining run at 64B; the four base
# models cost 5 such runs (SAM counts twice), about 65 H100-hours, plus 140 fine-tuning runs of 10M tokens.
out_dir = 'out/experiment_20m'
dataset = 'dclm'
prepare_args = '--source=hf:mlfoundations/dclm-baseline-1.0 --tokenizer=cl100k_base --max_tokens=64000000000'
bases = {
    'adamw': 'configs/adamw_20m.py',
    'sam': 'configs/sam_20m.py',
    'large_lr': 'configs/large_lr_20m.py',
    'short_anneal': 'configs/wsd_20m.py',
}
pretrain_args = ''
seeds = (1337,)
tasks = ('gsm8k', 'stackmathqa', 'starcoder', 'musicpile', 'tulu')
# the paper sweeps 7-11 values per base model; this grid (half-decades) is ours
learning_rates = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# the paper's SFT recipe (configs/sft/cpu.py lists it): 10M tokens of 64 x 1024, hub data
finetune_args = ('--source=hub --max_tokens=10000000 --block_size=1024 --batch_size=8 --gradient_accumulation_steps=8 '
                 '--val_tokens=1048576 --eval_interval=25 --eval_iters=80 --device=cuda --dtype=auto')
quantize_methods = ('nf4', 'fp4', 'int8')
quantize_args = ''
sharpness = 'noise,hessian,sam'
evaluate_args = '--batch_size=32 --eval_iters=80 --device=cuda'
jobs = 1
