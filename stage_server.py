"""
Runs experiment.py's stages as forks of one Python process that has imported torch and the project once, so that a
stage starts in milliseconds rather than the seconds a fresh interpreter spends importing torch, the compiler stack
that torch.optim loads and the task generators; and, asked to, has compiled a base model's training step and
evaluation once, so that the --compile=True stages forked after it do not compile them again (docs/speed_experiment.md
has the measurements).

    python stage_server.py OUT_DIR     # experiment.py starts it; OUT_DIR only names the experiment in `ps`

Apart from that compiled code this process holds no state a stage could see (it starts no threads, and leaves the
random number generators as they were), so a fork of it is the stage script as `python script args` would run it: its
own process, sys.argv, __main__, stdout and stderr into the stage's log, exit status (negative: killed by that signal),
and the OMP_NUM_THREADS this process was started with.
Protocol, one JSON line each way: experiment.py writes [name, argv, log, env] (argv = [script, args...], env: variables
to set) to stdin; when that stage ends, the server writes [name, exit status] to stdout. ["warm", checkpoint path,
batch_size, block_size] compiles that checkpoint's model for those batches (warm_compile; no answer). It exits when
stdin closes.
It dies with experiment.py, and its stages with it (PR_SET_PDEATHSIG, which experiment.py sets for the server).
"""
import atexit
import contextlib
import ctypes
import importlib
import json
import os
import runpy
import select
import signal
import sys
import time
import traceback

# what the stage scripts import, slowest first; a package that is not installed is left to the stage that needs it
PRELOAD = ('torch', 'torch._dynamo', 'reasoning_gym', 'numpy', 'tiktoken', 'tqdm', 'config', 'checkpoint', 'data',
           'model', 'sam', 'training', 'tasks', 'sharpness', 'analysis')


def run_stage(argv, log, env, server_pid, wakeup_fds):
    """In the forked child: become `python argv...` with stdout and stderr into log, then exit; never returns."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the server
    if os.getppid() != server_pid:  # the server died before prctl
        os._exit(1)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in wakeup_fds:
        os.close(fd)
    null, out = os.open(os.devnull, os.O_RDONLY), os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, 'w', closefd=False)  # block-buffered, as a redirected `python script` has it
    sys.stderr = open(2, 'w', buffering=1, errors='backslashreplace', closefd=False)
    os.environ.update(env)
    sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
    code = 0
    try:
        runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:  # what the interpreter makes of sys.exit(...)
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        code = code or 1
    os._exit(code)  # no interpreter teardown: it is slow in a fork of a torch process and frees nothing that matters


def warm_compile(checkpoint_path, batch_size, block_size=0):
    """Compile the model of checkpoint_path in this process as pretrain.py and finetune.py run it with --compile=True
    on a CPU in float32 on batches of batch_size x block_size (0: the model's context): the training step and the
    evaluation, each with and without a loss mask. torch.compile keeps compiled code with the model's code, under
    guards on the inputs, not with a model object: a stage forked afterwards that compiles a model of the same shape
    runs this code at once. Only with one thread: a fork of a process that has run OpenMP threads can hang."""
    import torch
    import torch._inductor.config
    import tqdm
    from checkpoint import load_checkpoint
    from model import GPT, GPTConfig
    from training import estimate_loss, train_step
    model_args = load_checkpoint(checkpoint_path)['model_args']
    model_args['block_size'] = block_size or model_args['block_size']  # the RoPE tables are built for it, as there
    shape = (2, batch_size, model_args['block_size'])
    x, y = torch.randint(model_args['vocab_size'], shape, generator=torch.Generator())
    monitor_interval, tqdm.tqdm.monitor_interval = tqdm.tqdm.monitor_interval, 0  # no tqdm monitor thread
    # compile_threads=1: no pool of compile workers (processes, and a thread here) for the forks to inherit
    with torch.random.fork_rng(devices=[]), torch._inductor.config.patch(compile_threads=1):
        model = GPT(GPTConfig(**model_args))
        compiled = torch.compile(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        for mask in (None, torch.ones_like(x, dtype=torch.bool)):
            train_step(compiled, optimizer, [(x, y, mask)], contextlib.nullcontext(), grad_clip=1.0)
            estimate_loss(compiled, lambda i: (x, y, mask), 1, contextlib.nullcontext())
    tqdm.tqdm.monitor_interval = monitor_interval


def warm(checkpoint_path, batch_size, block_size):
    """warm_compile, where it is safe; what it did goes to this process's stderr (experiment.py's stage_server.log)."""
    import torch
    if torch.get_num_threads() != 1:
        print(f"not compiling {checkpoint_path}: {torch.get_num_threads()} threads per stage", file=sys.stderr)
        return
    started = time.time()
    try:
        warm_compile(checkpoint_path, batch_size, block_size)
        print(f"compiled {checkpoint_path}'s model in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    except Exception:  # the stages compile for themselves
        traceback.print_exc()


def serve():
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    server_pid = os.getpid()
    wakeup_r, wakeup_w = os.pipe()  # a child's exit (SIGCHLD) wakes the select below at once
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    stages, pending = {}, b''  # pid -> stage name; a request line read in part
    while True:
        readable = select.select([0, wakeup_r], [], [])[0]
        if wakeup_r in readable:
            os.read(wakeup_r, 4096)
        while stages:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            print(json.dumps([stages.pop(pid), os.waitstatus_to_exitcode(status)]), flush=True)
        if 0 in readable:
            data = os.read(0, 1 << 16)
            if not data:  # experiment.py is done (its stages have ended) or gone (they die with this process)
                break
            *lines, pending = (pending + data).split(b'\n')
            for line in lines:
                request = json.loads(line)
                if request[0] == 'warm':
                    warm(*request[1:])
                    continue
                name, argv, log, env = request
                pid = os.fork()
                if pid == 0:
                    run_stage(argv, log, env, server_pid, (wakeup_r, wakeup_w))
                stages[pid] = name


if __name__ == '__main__':
    serve()
