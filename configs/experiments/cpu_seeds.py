# The default CPU experiment with three seeds, for the spread across seeds (README, "The CPU result"). It writes into
# the default experiment's out_dir, so seed 1337's stages are reused from `python experiment.py` if it ran, and only
# the new seeds and learning rates run. Not a paper setting.
seeds = (1337, 1338, 1339)
# a denser fine-tuning sweep than the default's four values near the top, where the frontiers turn steep and the
# matched fine-tuning loss falls (the paper sweeps 7-11 values); the default's four are among them, so reused
learning_rates = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2)
