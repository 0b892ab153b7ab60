"""stage_server.warm_compile: stages forked after it, compiling a model of the warmed shape, compile nothing."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh one-thread interpreter, as the server runs: warm the checkpoint's model (aot_eager instead of inductor:
# the same graphs and guards, without seconds of C++ compilation), then fork stages as the server does and count
# the graphs each compiled (torch._dynamo's counters).
SCRIPT = r"""
import functools, json, os, runpy, sys, threading, traceback
import torch, torch._dynamo
from torch._dynamo.utils import counters
sys.path.insert(0, os.getcwd())
import stage_server
torch.compile = functools.partial(torch.compile, backend='aot_eager')
ckpt, out, warm = sys.argv[1], sys.argv[2], sys.argv[3] == 'warm'
rng = torch.get_rng_state()
if warm:
    stage_server.warm_compile(ckpt, 8)
state = {'rng_kept': bool(torch.equal(rng, torch.get_rng_state())), 'threads': threading.active_count(),
         'warm_graphs': counters['stats']['unique_graphs'], 'stages': {}}
for name, argv in json.loads(sys.argv[4]).items():
    before = counters['stats']['unique_graphs']
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        sys.argv = argv
        with open(f'{out}.{name}.log', 'w') as log:
            sys.stdout = sys.stderr = log
            try:
                runpy.run_path(argv[0], run_name='__main__')
                code = 0
            except SystemExit as e:
                code = e.code or 0
            except BaseException:
                traceback.print_exc()
                code = 1
        os.write(write, json.dumps([code, counters['stats']['unique_graphs'] - before]).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    state['stages'][name] = json.loads(os.read(read, 1 << 16))
with open(out, 'w') as f:
    json.dump(state, f)
"""


def run_stages(tiny_ckpt, wiki, tmp_path, warm, batch_size=8):
    """{stage: [exit status, graphs it compiled]} and the warm-up's facts."""
    common = ['--device=cpu', '--dtype=float32', '--compile=True']
    stages = {
        'finetune': [os.path.join(REPO, 'finetune.py'), 'configs/sft/gsm8k.py', f'--init_from={tiny_ckpt}',
                     f'--out_dir={tmp_path / "ft"}', f'--pretrain_data={wiki}', '--block_size=0',
                     f'--batch_size={batch_size}',
                     '--gradient_accumulation_steps=1', '--max_tokens=1024', '--val_tokens=512', '--eval_iters=2',
                     '--eval_interval=2', *common],
        'pretrain': [os.path.join(REPO, 'pretrain.py'), f'--data_root={os.path.dirname(wiki)}',
                     f'--out_dir={tmp_path / "pt"}', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32',
                     f'--batch_size={batch_size}', '--gradient_accumulation_steps=1', '--max_iters=2',
                     '--warmup_iters=1', '--eval_interval=2', '--eval_iters=1', '--optimizer=sam', *common],
    }
    tmp_path.mkdir()
    out = tmp_path / 'state.json'
    result = subprocess.run([sys.executable, '-c', SCRIPT, tiny_ckpt, str(out), 'warm' if warm else 'cold',
                             json.dumps(stages)], cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(out.read_text())
    for name, (code, _) in state['stages'].items():
        assert code == 0, (tmp_path / f'state.json.{name}.log').read_text()[-3000:]
    return state


def test_stages_forked_after_warm_compile_compile_nothing(tiny_ckpt, wiki, tmp_path):
    state = run_stages(tiny_ckpt, wiki, tmp_path / 'warm', warm=True)
    assert state['warm_graphs'] > 0 and state['rng_kept'] and state['threads'] == 1
    # fine-tuning (masked batches, evaluation with and without a mask) and SAM pretraining at the checkpoint's shape
    assert state['stages'] == {'finetune': [0, 0], 'pretrain': [0, 0]}
    assert (tmp_path / 'warm' / 'ft' / 'result.json').exists() and (tmp_path / 'warm' / 'pt' / 'ckpt.pt').exists()


def test_without_warm_compile_or_at_another_shape_stages_compile(tiny_ckpt, wiki, tmp_path):
    # the control: the count above can see a stage compile
    cold = run_stages(tiny_ckpt, wiki, tmp_path / 'cold', warm=False)
    assert cold['warm_graphs'] == 0 and all(code == 0 and graphs > 0 for code, graphs in cold['stages'].values())
    other_shape = run_stages(tiny_ckpt, wiki, tmp_path / 'other', warm=True, batch_size=4)
    assert all(code == 0 and graphs > 0 for code, graphs in other_shape['stages'].values())
