"""The key declarations (keys.py): every script's config keys are declared, and bad values generated from each
declaration (out of range, wrong type, not one of the choices) stop the script with one line naming the key, before it
writes anything. Also what load_config does with config files and --key=value text, and docs/configs.md's tables."""
import ast
import glob
import os

import pytest

import keys
from config import UndeclaredKeyError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_keys(script):
    """The names a script assigns at top level before it calls load_config: its config block."""
    with open(os.path.join(REPO, script)) as f:
        tree = ast.parse(f.read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and 'load_config' in ast.unparse(node):
            return names
        if isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name) and not t.id.isupper()]
    raise AssertionError(f'{script} does not call load_config')


def test_every_script_and_key_is_declared():
    callers = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, '*.py'))
                     if 'load_config(' in open(p).read() and not p.endswith(('config.py', 'keys.py')))
    assert callers == sorted(keys.SCRIPTS)
    for script, table in keys.SCRIPTS.items():
        assert sorted(script_keys(script)) == sorted(table), script


def test_undeclared_key_is_loud():
    with pytest.raises(UndeclaredKeyError, match="config key 'new_key' has no declaration"):
        load_config({'lr': 1.0, 'new_key': 2}, [], {'lr': keys.Key(float)})


def bad_values(key):
    """Values the declaration forbids, as --key=value text: (text, why)."""
    if key.type is bool:
        return [('maybe', 'wrong type'), ('1', 'wrong type')]
    if key.type is dict:
        return [('1', 'wrong type'), ('[1]', 'wrong type')]
    if key.type is tuple:
        kind = key.item
        cases = [('abc', 'not a tuple'), ('(1,)' if kind is str else "(1, 'x')", 'wrong item type')]
        if key.required:
            cases.append(('()', 'empty'))
        cases += [(f'({v},)', 'item out of range') for v, _ in range_cases(key)]
        if key.choices:
            cases.append(("('nonsense',)", 'not a choice'))
        return cases
    if key.type in (int, float):
        cases = [('abc', 'wrong type')] + [(repr(v), why) for v, why in range_cases(key)]
        return cases + ([('1.5', 'wrong type')] if key.type is int else [('1e999', 'infinite')])
    cases = [('nonsense', 'not a choice')] if key.choices else []
    if key.pattern:
        cases.append((next(t for t in ('gpu0', 'a/b', 'c/{x}.py') if key.problem(t)), 'no match'))
    if key.required:
        cases.append(('', 'empty'))
    return cases


def range_cases(key):
    """Numbers just outside the declared range (not among the extra allowed values)."""
    step = 1 if (key.item or key.type) is int else 0.5
    cases = []
    for low in (key.min, key.above):
        if low is not None:
            v = low if low == key.above else low - step
            while v in key.also:
                v -= step
            cases.append((v, 'below the range'))
    for high in (key.max, key.below):
        if high is not None:
            cases.append((high if high == key.below else high + step, 'above the range'))
    return cases


def base_args(script, tmp):
    """Values for a script's required keys, and every output path inside tmp (which must stay empty)."""
    return {'pretrain.py': [f'--out_dir={tmp}/run', f'--data_root={tmp}/data'],
            'finetune.py': ['--init_from=base.pt', f'--out_dir={tmp}/run'],
            'quantize.py': ['--init_from=base.pt', f'--out_dir={tmp}/run'],
            'evaluate.py': ['--checkpoints=base.pt', f'--out={tmp}/eval.json'],
            'prepare.py': [f'--data_root={tmp}/data'],
            'export_hf.py': ['--init_from=base.pt', f'--out_dir={tmp}/run'],
            'import_hf.py': ['--init_from=hf:x', f'--out_dir={tmp}/run', f'--data_root={tmp}/data'],
            'experiment.py': [f'--out_dir={tmp}/run', f'--data_root={tmp}/data']}.get(script, [])


GENERATED = [(script, name, text, why) for script, table in keys.SCRIPTS.items() for name, key in table.items()
             for text, why in bad_values(key)]


def generated_ids():
    return [f'{script[:-3]}/{name}={text}' for script, name, text, _ in GENERATED]


@pytest.mark.parametrize('script,name,text,why', GENERATED, ids=generated_ids())
def test_generated_bad_value(run_script, tmp_path, script, name, text, why):
    result = run_script(script, *base_args(script, tmp_path), f'--{name}={text}')
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (why, result.stderr[-2000:])
    assert lines[0].startswith(f'{script}: error: {name} must be '), (why, lines[0])
    assert result.stdout == '' and os.listdir(tmp_path) == []  # no work started, nothing written


def test_declared_defaults_are_allowed():
    for script, table in keys.SCRIPTS.items():
        with open(os.path.join(REPO, script)) as f:
            source = f.read()
        block = source[:source.index('config = load_config(')]
        block = block[block.index('# ----'):]  # the config block alone
        defaults = {}
        exec(compile(block, script, 'exec'), defaults)
        for name, key in table.items():
            value = key.coerce(defaults[name])
            assert value is not None, (script, name)
            assert key.problem(value) is None or key.required and value == '', (script, name, value)


# load_config: config files and command-line text ------------------------------------------------------------------

TABLE = {'dataset': keys.Key(str), 'out_dir': keys.Key(str), 'lr': keys.Key(float, above=0),
         'sigmas': keys.Key(tuple, item=float, min=0)}
DEFAULTS = {'dataset': 'wiki_en', 'out_dir': 'out', 'lr': 1.0, 'sigmas': (0.1,)}


def test_string_keys_take_the_text_as_typed():
    config = load_config(DEFAULTS, ['--dataset=none', '--out_dir=2024', '--lr=3', '--sigmas=[1, 0.5]'], TABLE)
    assert config == {'dataset': 'none', 'out_dir': '2024', 'lr': 3.0, 'sigmas': (1.0, 0.5)}


@pytest.mark.parametrize('content,phrase', [
    ('import sys\nsys.exit(3)\n', 'called sys.exit(3); a config file only sets variables'),
    ('lr = 1 / 0\n', 'ZeroDivisionError'),
    ('dataset = 5\n', "dataset must be a string, got int 5"),
])
def test_config_file_problems(tmp_path, capsys, content, phrase):
    path = tmp_path / 'c.py'
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        load_config(DEFAULTS, [str(path)], TABLE)
    assert e.value.code == 2 and phrase in capsys.readouterr().err


def test_config_path_is_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_config(DEFAULTS, [str(tmp_path)], TABLE)
    assert f'config file {tmp_path} is a directory' in capsys.readouterr().err


def test_docs_hold_the_declarations():
    with open(os.path.join(REPO, 'docs', 'configs.md')) as f:
        assert keys.markdown() in f.read(), 'regenerate the tables: python keys.py'


# the documents' bad-input counts ------------------------------------------------------------------------------------

def bad_input_table():
    """docs/reliability.md's table: per script, its declared keys and the bad values generated from them."""
    rows = ['| script | declared keys | generated bad values |', '|---|---|---|']
    for script, table in keys.SCRIPTS.items():
        rows.append(f'| `{script}` | {len(table)} | {sum(len(bad_values(key)) for key in table.values())} |')
    total_keys = sum(len(table) for table in keys.SCRIPTS.values())
    return '\n'.join(rows + [f'| all | {total_keys} | {len(GENERATED)} |'])


def hand_written_cases():
    """The test_bad_input cases written by hand, across the test files that hold them."""
    import test_bad_input
    import test_evaluate
    import test_finetune
    import test_pretrain
    import test_quantize
    return sum(map(len, (test_pretrain.BAD_CASES, test_finetune.BAD_CASES, test_quantize.BAD, test_evaluate.BAD,
                         test_bad_input.CASES)))


def test_docs_count_the_bad_inputs():
    with open(os.path.join(REPO, 'docs', 'reliability.md')) as f:
        reliability = f.read()
    assert bad_input_table() in reliability, 'update the table: ' + bad_input_table()
    hand = hand_written_cases()
    summary = f'{len(GENERATED) + hand} bad inputs ({len(GENERATED)} generated from keys.py, {hand} written by hand)'
    assert summary in reliability, summary
    with open(os.path.join(REPO, 'README.md')) as f:
        assert summary in f.read(), summary
