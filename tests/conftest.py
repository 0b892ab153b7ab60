"""Shared fixtures: one small prepared dataset and tiny checkpoints for the session, one-thread mode for modules."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def wiki(tmp_path_factory):
    """data_root/wiki_en prepared by prepare.py from the embedded corpus: 300 documents, a 512-token BPE."""
    root = tmp_path_factory.mktemp('data')
    result = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), f'--data_root={root}', '--max_docs=300',
                             '--vocab_size=512'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return str(root / 'wiki_en')


@pytest.fixture(scope='session')
def tiny_ckpt(wiki, tmp_path_factory):
    """ckpt.pt of a 1-layer model (d 32, block 32) pretrained 8 iterations on `wiki` by pretrain.py; read-only."""
    out = tmp_path_factory.mktemp('tiny_ckpt')
    args = [f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--block_size=32', '--batch_size=8', '--gradient_accumulation_steps=1', '--max_iters=8', '--warmup_iters=1',
            '--learning_rate=1e-2', '--eval_interval=8', '--eval_iters=2', '--device=cpu', '--dtype=float32']
    result = subprocess.run([sys.executable, os.path.join(REPO, 'pretrain.py'), *args], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out / 'ckpt.pt')


@pytest.fixture(scope='session')
def run_script():
    """run_script('quantize.py', '--key=value', ...) runs a repository script in this process, as `python script
    args` would (sys.argv, __main__), and returns a CompletedProcess with its exit code, stdout and stderr. For
    the many short failing runs of bad-input tests: no 2-3 s interpreter start each (a fresh interpreter's own
    noise, e.g. import-time warnings, needs a real subprocess)."""
    import contextlib
    import io
    import runpy

    def run(script, *args):
        argv = [os.path.join(REPO, script), *map(str, args)]
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv, out, err = argv, io.StringIO(), io.StringIO()
        sys.path.insert(0, REPO)
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_path(argv[0], run_name='__main__')
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    return run


@pytest.fixture(scope='session')
def hf_dir(tiny_ckpt, run_script, tmp_path_factory):
    """tiny_ckpt exported by export_hf.py: the same model as a Hugging Face directory."""
    out = str(tmp_path_factory.mktemp('hf_export') / 'hf')
    result = run_script('export_hf.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}')
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models run far faster on one thread of the 2-core CI machine (two oversubscribe it, 5-10x slower);
    for the modules that ask for it, like the subprocesses' OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_script():
    """run(script, *args): the script in a fresh interpreter (one thread), for checks that in-process runs can't make."""
    def run(script, *args):
        return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    return run


FORKSERVER = r"""
import atexit, json, os, runpy, sys, traceback
import numpy, tiktoken, torch, torch._dynamo, tqdm  # what makes a start slow, imported once (torch runs nothing here)
for line in sys.stdin:
    argv, cwd, stdout, stderr, env = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child becomes `python script ...`: its own stdout, stderr, environment and exit status
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.stdin = open(os.devnull)
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
        if 'FLATMIN_TEST_HOOK' in env:  # tests/test_reliability.py's kill points
            sys.path.append(os.path.join(cwd, 'tests', 'fault_injection'))
            import fault_injection
            fault_injection.install()
        try:
            runpy.run_path(argv[0], run_name='__main__')
            code = 0
        except SystemExit as e:  # as the interpreter reports it
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # then skip the module teardown, which is slow in a fork of a torch process
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)  # -9: killed by SIGKILL
os._exit(0)
"""


@pytest.fixture(scope='session')
def fork_script(tmp_path_factory):
    """fork_script(script, *args, env={}) -> Forked: the script run as `python script args` (one thread) would run it,
    but forked from a Python that has already imported torch, so a start takes well under a second instead of the
    2-3 s of `import torch` and interpreter teardown. Forked.pid is the script's process (to kill it);
    Forked.wait(timeout) its CompletedProcess (returncode -9 if SIGKILLed). One script at a time."""
    import select
    server = subprocess.Popen([sys.executable, '-c', FORKSERVER], cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    logs = tmp_path_factory.mktemp('fork_logs')

    def read_line(timeout, what):
        if not select.select([server.stdout], [], [], timeout)[0]:
            os.killpg(server.pid, 9)  # the server and the script
            pytest.fail(f'{what} did not finish in {timeout} s')
        line = server.stdout.readline()
        assert line, f'the fork server died (exit status {server.poll()})'
        return int(line)

    class Forked:
        def __init__(self, script, *args, env=None):
            self.argv = [os.path.join(REPO, script), *map(str, args)]
            self.out, self.err = str(logs / 'stdout'), str(logs / 'stderr')
            server.stdin.write(json.dumps([self.argv, REPO, self.out, self.err, env or {}]) + '\n')
            server.stdin.flush()
            self.pid = read_line(60, 'the fork')

        def wait(self, timeout=120):
            code = read_line(timeout, ' '.join(self.argv))
            with open(self.out) as f_out, open(self.err) as f_err:
                return subprocess.CompletedProcess(self.argv, code, f_out.read(), f_err.read())
    yield Forked
    server.stdin.close()
    server.wait(timeout=120)
