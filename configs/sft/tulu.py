# Fine-tuning on the Tulu-3 SFT mixture (chat; loss on the assistant turns only).
#
# The paper (GPU, small models): allenai/tulu-3-sft-mixture (messages), 10M tokens.
#
# Offline stand-in (source='offline', the default here): a mixture of reasoning-gym instruction-following tasks
# (NOT Tulu-3).
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'tulu'
out_dir = 'out/sft_tulu'
