"""Kill points for tests/test_reliability.py, injected from outside the training scripts.

With FLATMIN_TEST_HOOK=<event>:<n>:<marker> set, install() makes a training script write its pid to <marker> at that
point and then sleep until the test SIGKILLs it, so every kill lands exactly where the test says. Events:
  iter  the loop takes up iteration n (it asks for that iteration's learning rate: after any evaluation and
        checkpoint at n, before its step);
  save  the n-th checkpoint this process writes: torch.save has returned, the temporary file is neither closed nor
        renamed yet.
  weights  no kill: at iteration n (as for iter) each rank saves its model's weights to <marker>.rank<RANK>.pt and
        goes on, so a DDP test can compare what the ranks hold.
Under DDP only the rank FLATMIN_TEST_HOOK_RANK (default: every rank) stops. A Python started with this directory and
the repository on PYTHONPATH installs it (sitecustomize.py); conftest's fork server calls install() itself.
"""
import os
import time


def pause(marker):
    with open(marker + '.tmp', 'w') as f:
        f.write(str(os.getpid()))
    os.replace(marker + '.tmp', marker)  # the test never reads half a pid
    while True:
        time.sleep(60)


def install():
    spec = os.environ.get('FLATMIN_TEST_HOOK')
    if not spec or os.environ.get('FLATMIN_TEST_HOOK_RANK', os.environ.get('RANK')) != os.environ.get('RANK'):
        return
    event, at, marker = spec.split(':', 2)
    at = int(at)
    if event == 'iter':
        import training  # the scripts' `from training import lr_at` then finds this one
        real_lr_at = training.lr_at

        def lr_at(it, *args, **kwargs):
            if it == at:
                pause(marker)
            return real_lr_at(it, *args, **kwargs)
        training.lr_at = lr_at
    elif event == 'save':
        import torch  # checkpoint.save_checkpoint writes through torch.save
        real_save, saves = torch.save, [0]

        def save(*args, **kwargs):
            real_save(*args, **kwargs)
            saves[0] += 1
            if saves[0] == at:
                pause(marker)
        torch.save = save
    elif event == 'weights':
        import inspect

        import torch
        import training
        real_lr_at = training.lr_at

        def lr_at(it, *args, **kwargs):
            if it == at:  # the caller is the training script's loop: its module globals hold raw_model
                model = inspect.currentframe().f_back.f_globals['raw_model']
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                           f"{marker}.rank{os.environ.get('RANK', '0')}.pt")
            return real_lr_at(it, *args, **kwargs)
        training.lr_at = lr_at
    else:
        raise ValueError(f"FLATMIN_TEST_HOOK: unknown event {event!r}")
