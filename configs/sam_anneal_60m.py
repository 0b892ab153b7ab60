# The paper's SAM-anneal variant at 60M: constant-LR AdamW for 90% of the run, then a 10% linear anneal
# trained with SAM only (sam_start_fraction). The AdamW twin is configs/wsd_60m.py with anneal_fraction=0.1.
from configs.adamw_60m import *

out_dir = 'out/sam_anneal_60m'
lr_schedule = 'wsd'
anneal_fraction = 0.1
optimizer = 'sam'
sam_start_fraction = 0.9
