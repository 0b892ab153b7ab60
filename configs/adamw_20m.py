# The paper's 20M model (d 256, 8 layers, 8 heads) with AdamW, GPU scale: 8 GPUs x 32 sequences x 1024 tokens
# = 262,144 tokens per step. Default budget 64B tokens; the paper sweeps 4, 8, 16, 32, 64B tokens
# (max_iters = tokens / 262144) with peak lr 3e-3 up to 16B and 1e-3 from 32B.
# Data: python prepare.py --dataset=dclm --source=hf:mlfoundations/dclm-baseline-1.0 --tokenizer=cl100k_base \
#           --max_tokens=...
out_dir = 'out/adamw_20m'
dataset = 'dclm'
n_layer = 8
n_head = 8
n_embd = 256
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 8
max_iters = 244141  # 64B tokens
warmup_iters = 1000
learning_rate = 1e-3
lr_schedule = 'cosine'
min_lr_ratio = 0.1
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 2000
eval_iters = 80  # 80 x 32 x 1024 = 2.6M validation tokens
log_interval = 10
compile = True
