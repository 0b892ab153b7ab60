# The paper's 60M model (d 512, 8 layers, 8 heads) with AdamW, GPU scale: 262,144 tokens per step.
# Default budget 192B tokens; the paper sweeps 12, 24, 48, 96, 192B (max_iters = tokens / 262144) with peak lr
# 1e-3 up to 24B, 6e-4 for 48-96B and 3e-4 at 192B.
from configs.adamw_20m import *

out_dir = 'out/adamw_60m'
n_layer = 8
n_head = 8
n_embd = 512
max_iters = 732422  # 192B tokens
warmup_iters = 2000
learning_rate = 3e-4
