# The paper's OLMo-2-1B mid-training, SAM arm: configs/olmo2_1b_mid_adamw.py with SAM (rho 0.05, plain, every step,
# over the same AdamW and schedule; the ascent gradient local to each GPU, as in the paper). Twice the compute of
# the AdamW arm (two forward/backward passes per step) and one more parameter-sized buffer (docs/olmo2.md, memory
# table).
from configs.olmo2_1b_mid_adamw import *

out_dir = 'out/olmo2_1b_mid_sam'
optimizer = 'sam'
sam_rho = 0.05
