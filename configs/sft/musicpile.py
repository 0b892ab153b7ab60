# Fine-tuning on MusicPile ABC-notation music (raw text; every token trained).
#
# The paper (GPU, small models): m-a-p/MusicPile (text), 10M tokens.
#
# Offline stand-in (source='offline', the default here): the ABC folk tunes of music21's corpus (NOT MusicPile).
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'musicpile'
out_dir = 'out/sft_musicpile'
