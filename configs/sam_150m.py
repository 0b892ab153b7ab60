# SAM (rho 0.05, every step, AdamW base with the same schedule) on the paper's 150M recipe.
# Under DDP the ascent gradient stays local to each GPU (m-sharpness), as in the paper.
from configs.adamw_150m import *

out_dir = 'out/sam_150m'
optimizer = 'sam'
sam_rho = 0.05
