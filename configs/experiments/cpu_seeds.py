# The default CPU experiment with three seeds, for the spread across seeds (README, "The CPU result"). It writes into
# the default experiment's out_dir, so seed 1337's stages are reused from `python experiment.py` if it ran, and only
# the new seeds and learning rates run. Not a paper setting.
seeds = (1337, 1338, 1339)
