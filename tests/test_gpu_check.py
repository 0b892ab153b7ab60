"""gpu_check.py on the CPU at a tiny shape, so that the GPU check stays runnable between the days a GPU is lent."""
import json


def test_gpu_check_runs_on_cpu_and_writes_its_report(fork_script, tmp_path):
    out = tmp_path / 'check.json'
    result = fork_script('gpu_check.py', '--device=cpu', '--tiny=True', '--compile_backend=aot_eager', '--steps=2',
                         '--warmup_steps=1', '--check_steps=4', f'--out={out}').wait()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report['checks']
    assert checks['sam_bf16']['passed'] and checks['sam_bf16']['perturbed_loss_higher'] == 4
    assert 0 < checks['sam_bf16']['max_relative_loss_difference'] < 0.02  # bf16 differs, a little
    assert checks['resume'] == {'bitwise_equal': True, 'max_abs_difference': 0.0, 'control_bitwise_equal': True,
                                'dtype': 'float32', 'passed': True}
    tiny = report['sizes']['tiny']
    for name in ('adamw', 'sam'):
        assert tiny[name]['tokens_per_s'] > 0 and tiny[name]['tflops'] > 0 and tiny[name]['mfu'] is None
    assert tiny['sam_adamw_step_time'] > 0 and report['peak_bf16_flops'] is None


def test_gpu_check_refuses_an_unknown_size(fork_script, tmp_path):
    result = fork_script('gpu_check.py', '--device=cpu', "--sizes=('7b',)", f'--out={tmp_path / "x.json"}').wait()
    assert result.returncode == 2 and "sizes must be a non-empty tuple, each item one of '20m'" in result.stderr
    assert not (tmp_path / 'x.json').exists()
