# CPU preset (not a paper setting): configs/cpu_adamw.py trained with SAM (rho 0.05, AdamW base).
# Each step costs two forward/backward passes, so this takes about twice as long as cpu_adamw.
from configs.cpu_adamw import *

out_dir = 'out/cpu_sam'
optimizer = 'sam'
sam_rho = 0.05
