"""
Crash-safe files: every output is written to a temporary file in the same
directory, flushed to disk, then renamed over the target, so a killed run leaves
either the old file or the new one, never half of one. A write that fails (a full
disk, an unwritable directory) stops the script with one line and leaves the target
as it was.
"""
import contextlib
import glob
import json
import os
import subprocess
import tempfile

import torch

from config import fail, is_allocation_failure

CHECKPOINT_FORMAT = 1


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename."""
    directory, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs should get the usual permissions
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # the body only writes: a full disk, a directory that is a file or read-only, ...
        where = f": {e.filename}" if e.filename not in (None, path, tmp) else ''
        fail(f"could not write {path} ({e.strerror or e}{where})")
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(directory, names):
    """Remove the temporary files that a killed run left beside its outputs `names` (atomic_path's '.<name>.*.tmp').
    Nothing ever reads them; this only frees the space (a checkpoint's can be gigabytes)."""
    for name in names:
        for path in glob.glob(os.path.join(glob.escape(directory), f'.{glob.escape(name)}.*.tmp')):
            os.remove(path)


def append_jsonl(path, record):
    """One JSON line appended to a log. A kill can cut the last line short: truncate_log drops such a line."""
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        fail(f"could not write {path} ({e.strerror or e})")


def truncate_log(path, iter_num):
    """Rewrite a JSONL log keeping only the records of iterations <= iter_num (on resume: drop what a killed run
    logged after its checkpoint, and a line cut short; iter_num=-1 starts an empty log)."""
    kept = []
    if iter_num >= 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get('iter', 0) <= iter_num:
                        kept.append(line)
                except (ValueError, AttributeError):  # a line cut short by a kill mid-write
                    pass
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.writelines(kept)


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
    # through a Python file: a full disk is then an OSError (torch.save(path) reports it as an opaque RuntimeError)
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        try:
            torch.save(checkpoint, f)
        except RuntimeError as e:
            raise OSError(f"torch.save failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_checkpoint(path, map_location='cpu'):
    """Load one of our checkpoints, or stop with one line saying why it cannot be used."""
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, wrong file type, ...
        fail(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})")
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or type(checkpoint.get('model_args')) is not dict:
        fail(f"{path} is not a checkpoint written by this repository (no 'model'/'model_args')")
    if checkpoint.get('format_version') != CHECKPOINT_FORMAT:  # a newer one needs newer code; an older one a converter
        fail(f"{path} has checkpoint format {checkpoint.get('format_version', 'none')}; this code reads format "
             f"{CHECKPOINT_FORMAT} only")
    return checkpoint


def build_model(model_args, state_dict, path, check_only=False):
    """GPT(model_args) holding state_dict (from checkpoint `path`); one line if they do not fit this code's model.
    check_only: only that check, on the meta device (no memory, no copy), to refuse a checkpoint before any work."""
    from model import GPT, GPTConfig  # here, not at the top: data-only scripts need not import the model
    try:
        with torch.device('meta') if check_only else contextlib.nullcontext():
            model = GPT(GPTConfig(**model_args))
        model.load_state_dict(state_dict, assign=check_only)
    except (TypeError, RuntimeError) as e:  # load_state_dict's first line is a heading: say which keys differ
        if is_allocation_failure(e):
            fail(f"out of memory building the model of {path} (block_size {model_args.get('block_size')}): "
                 f"lower block_size or use a machine with more memory")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith('Error(s) in loading') else lines[0]
        fail(f"checkpoint {path} does not match this code's model ({detail[:200]})")
    return model


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict) for any checkpoint of ours; one line if it does not fit."""
    checkpoint = load_checkpoint(path, map_location=device)
    return build_model(checkpoint['model_args'], checkpoint['model'], path).to(device).eval(), checkpoint
