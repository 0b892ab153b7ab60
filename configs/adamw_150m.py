# The paper's 150M model (d 768, 12 layers, 12 heads) with AdamW, GPU scale: 262,144 tokens per step.
# Default budget 240B tokens; the paper sweeps 15, 30, 60, 120, 240B (max_iters = tokens / 262144) with peak lr
# 1e-3 up to 30B, 6e-4 at 60B and 3e-4 from 120B.
from configs.adamw_20m import *

out_dir = 'out/adamw_150m'
n_layer = 12
n_head = 12
n_embd = 768
max_iters = 915528  # 240B tokens
warmup_iters = 3000
learning_rate = 3e-4
