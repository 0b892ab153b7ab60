# Short anneal on the paper's 150M recipe: warmup-stable-decay, constant peak lr, then linear decay to
# 0.1x peak over the final 5% of steps. The paper sweeps anneal_fraction over {0.05, 0.1, 0.2, 0.5, 1.0}.
from configs.adamw_150m import *

out_dir = 'out/wsd_150m'
lr_schedule = 'wsd'
anneal_fraction = 0.05
