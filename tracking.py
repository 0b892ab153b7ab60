"""
Experiment tracking: every record pretrain.py / finetune.py append to log.jsonl is mirrored, unchanged, to
Weights & Biases (wandb_log=True) and/or TensorBoard (tensorboard_dir=...). Both are optional dependencies, imported
only when enabled; log.jsonl stays the source of truth. Details in docs/ecosystem.md.

    tracking.check_installed(config)                                      # at start-up: one line if one is missing
    tracker = tracking.Tracker(config, out_dir, 'pretrain', resume_iter, enabled=master)
    tracker.log(record)                                                   # beside each append_jsonl(log_path, record)
    tracker.close()

A record's 'iter' is the step; every other number (bools as 0/1) is a scalar of that name. A resumed run
(resume_iter = the checkpoint's iteration) continues the same W&B run (its id is kept in out_dir/wandb_run.json,
resume='allow'; steps W&B already holds are not sent again) and the same TensorBoard series (purge_step drops what
a killed run wrote after its checkpoint, as log.jsonl's truncation does).
"""
import importlib.util
import json
import os
import secrets

from checkpoint import write_json
from config import fail


def check_installed(config):
    for key, package in (('wandb_log', 'wandb'), ('tensorboard_dir', 'tensorboard')):
        if config[key] and importlib.util.find_spec(package) is None:
            fail(f"{key}={config[key]!r} needs the optional package {package}: pip install {package} "
                 f"(or pip install -r requirements-hf.txt)")


class Tracker:
    """Mirrors records to what config's wandb_log / tensorboard_dir ask for; nothing when not enabled (DDP ranks
    other than 0). resume_iter: the iteration a resumed run continues from, None for a new run."""

    def __init__(self, config, out_dir, job_type, resume_iter=None, enabled=True):
        self.wandb_run, self.writer, self.first_wandb_step = None, None, 0
        if enabled and config['wandb_log']:
            import wandb
            id_path = os.path.join(out_dir, 'wandb_run.json')
            run_id = None
            if resume_iter is not None and os.path.isfile(id_path):
                with open(id_path) as f:
                    run_id = json.load(f).get('id')
            run_id = run_id or secrets.token_hex(6)
            write_json({'id': run_id}, id_path)
            self.wandb_run = wandb.init(project=config['wandb_project'], group=config['wandb_group'] or None,
                                        name=config['wandb_run_name'] or os.path.basename(os.path.abspath(out_dir)),
                                        job_type=job_type, id=run_id, resume='allow', config=config,
                                        **({} if os.environ.get('WANDB_DIR') else {'dir': out_dir}))
            self.first_wandb_step = self.wandb_run.step  # > 0 when the server already holds the resumed run's steps
        if enabled and config['tensorboard_dir']:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(config['tensorboard_dir'],
                                        purge_step=0 if resume_iter is None else resume_iter + 1)

    def log(self, record):
        step = record['iter']
        values = {k: float(v) for k, v in record.items() if k != 'iter' and isinstance(v, (int, float))}
        if self.wandb_run is not None and step >= self.first_wandb_step:
            self.wandb_run.log(values, step=step)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.writer is not None:
            self.writer.close()
