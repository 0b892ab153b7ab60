# Investigation (README, "The CPU result"): does a larger SAM radius change forgetting at this scale? cpu_seeds.py
# plus a fifth base model, SAM with rho 0.2 (4x the paper's 0.05). Same out_dir: the cpu_seeds stages are reused
# and only the new base model's run. Not a paper setting.
from configs.experiments.cpu_seeds import *

bases = {
    'adamw': 'configs/cpu_small.py',
    'sam': 'configs/cpu_small.py --optimizer=sam --sam_rho=0.05',
    'large_lr': 'configs/cpu_small.py --learning_rate=1e-2',
    'short_anneal': 'configs/cpu_small.py --lr_schedule=wsd --anneal_fraction=0.05',
    'sam_rho0.2': 'configs/cpu_small.py --optimizer=sam --sam_rho=0.2',
}
