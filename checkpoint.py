"""
Crash-safe files: every output is written to a temporary file in the same
directory, flushed to disk, then renamed over the target, so a killed run leaves
either the old file or the new one, never half of one.
"""
import contextlib
import json
import os
import subprocess
import tempfile

import torch

from config import fail

CHECKPOINT_FORMAT = 1


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs should get the usual permissions
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


def code_version():
    """The repository's git commit (short), recorded in checkpoints; None outside a git checkout."""
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def save_checkpoint(checkpoint, path):
    checkpoint = {'format_version': CHECKPOINT_FORMAT, **checkpoint}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path, map_location='cpu'):
    """Load one of our checkpoints, or stop with one line saying why it cannot be used."""
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, wrong file type, ...
        fail(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})")
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'model_args' not in checkpoint:
        fail(f"{path} is not a checkpoint written by this repository (no 'model'/'model_args')")
    if checkpoint.get('format_version', 0) > CHECKPOINT_FORMAT:
        fail(f"{path} has checkpoint format {checkpoint['format_version']}; this code reads up to {CHECKPOINT_FORMAT}")
    return checkpoint


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict) for any checkpoint of ours; one line if it does not fit."""
    from model import GPT, GPTConfig  # here, not at the top: data-only scripts need not import the model
    checkpoint = load_checkpoint(path, map_location=device)
    try:
        model = GPT(GPTConfig(**checkpoint['model_args']))
        model.load_state_dict(checkpoint['model'])
    except (TypeError, RuntimeError) as e:
        fail(f"checkpoint {path} does not match this code's model ({str(e).splitlines()[0]})")
    return model.to(device).eval(), checkpoint
