# The paper's 150M model (d 768, 12 layers, 12 heads) with AdamW, GPU scale: 8 GPUs x 32 sequences x 1024 tokens
# = 262,144 tokens per step.
# Default budget 240B tokens; the paper sweeps 15, 30, 60, 120, 240B (max_iters = tokens / 262144) with peak lr
# 1e-3 up to 30B, 6e-4 at 60B and 3e-4 from 120B.
out_dir = 'out/adamw_150m'
dataset = 'dclm'
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 8
max_iters = 915528  # 240B tokens
warmup_iters = 3000
learning_rate = 3e-4
lr_schedule = 'cosine'
min_lr_ratio = 0.1
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 2000
eval_iters = 80  # 80 x 32 x 1024 = 2.6M validation tokens
log_interval = 10
compile = True
