"""
Config loading shared by every stage script, nanoGPT style.

A script defines its defaults as plain top-level variables, then calls

    config = load_config(config_defaults(globals()), sys.argv[1:], keys.PRETRAIN)

where argv may hold config files (plain Python files whose top-level variables
override the defaults; they may `from configs.other import *`) and --key=value
overrides, applied left to right. Every key is then checked against its
declaration in keys.py: an unknown key, a value of the wrong type or out of
range stops the script with one line on stderr naming it.
"""
import ast
import contextlib
import os
import re
import runpy
import sys
import types

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_TYPES = (bool, int, float, str, type(None), list, tuple, dict)


class ConfigError(Exception):
    pass


class UndeclaredKeyError(Exception):
    """A script's config keys and its table in keys.py differ."""


def fail(message, code=2):
    """One clear line on stderr, then a non-zero exit: how every script reports bad input."""
    if 'tqdm' in sys.modules:  # a failure mid-run (a full disk): end the progress bar's line, so the error has its own
        for bar in list(sys.modules['tqdm'].tqdm._instances):
            bar.close()
    print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {message}", file=sys.stderr)
    sys.exit(code)


def config_defaults(namespace):
    """The config-like variables of a script's globals(): everything a user may override (not UPPER_CASE constants)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and type(v) in CONFIG_TYPES}  # UPPER_CASE = constants


def parse_value(text):
    """'3e-4' -> 3e-4, 'True' -> True, 'out/x' -> 'out/x' (anything not a Python literal is a string)."""
    lowered = text.lower()
    if lowered in ('true', 'false'):
        return lowered == 'true'
    if lowered in ('none', 'null'):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # '{[1]: 2}', '((((...'
        return text


def read_config_file(path):
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; give a config file (configs/*.py)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if REPO_ROOT not in sys.path:  # lets a config file `from configs.base import *`
        sys.path.insert(0, REPO_ROOT)
    try:
        namespace = runpy.run_path(path)
    except SystemExit as e:
        raise ConfigError(f"{path} called sys.exit({e.code!r}); a config file only sets variables") from None
    except Exception as e:
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def load_config(defaults, argv, declared):
    """Apply config files and --key=value overrides (in order) to a copy of defaults, then check every key against
    its declaration (declared: the script's table in keys.py)."""
    undeclared, stale = sorted(set(defaults) - set(declared)), sorted(set(declared) - set(defaults))
    if undeclared or stale:  # a programming error, not bad input: loud, with a traceback
        problems = ([f"config key {k!r} has no declaration: add a line for it to the script's table in keys.py"
                     for k in undeclared] +
                    [f"keys.py declares {k!r}, which is not a config key of the script: remove its line"
                     for k in stale])
        raise UndeclaredKeyError(f"{os.path.basename(sys.argv[0])}: " + '; '.join(problems))
    config, sources = dict(defaults), {}
    try:
        for arg in argv:
            if arg.startswith('--'):
                key, sep, text = arg[2:].partition('=')
                if not sep:
                    raise ConfigError(f"override {arg!r} must look like --key=value")
                value = parse_value(text)
                if key in declared and declared[key].type is str:  # --dataset=none, --out_dir=2024: as typed
                    value = text
                updates, source = {key: value}, 'command line'
            else:
                updates, source = read_config_file(arg), arg
            for key, value in updates.items():
                if key not in defaults:
                    raise ConfigError(f"unknown config key {key!r} ({source})")
                coerced = declared[key].coerce(value)
                if coerced is None:
                    raise ConfigError(f"{key} must be {declared[key].allowed()}, got {type(value).__name__} "
                                      f"{value!r} ({source})")
                config[key], sources[key] = coerced, source
        for key, value in config.items():
            problem = declared[key].problem(value)
            if problem:
                raise ConfigError(f"{key} must be {problem}, got {value!r}" +
                                  (f" ({sources[key]})" if key in sources else ''))
    except ConfigError as e:
        fail(str(e))
    return config


def is_allocation_failure(e):
    """A failed allocation (torch's CPU allocator, CUDA out of memory, MemoryError): sizes too large, not a bug."""
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and any(
        phrase in str(e) for phrase in ("can't allocate memory", 'out of memory', 'Cannot allocate memory'))


@contextlib.contextmanager
def sized_by(keys_text):
    """Under it, a failed allocation is one line naming the config keys that set the sizes (keys_text)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_allocation_failure(e):
            raise
        tried = re.search(r'allocate (\d+) bytes', str(e))
        needed = f" (it needed {int(tried[1]) / 2**30:,.1f} GiB at once)" if tried else ''
        fail(f"out of memory: lower {keys_text}{needed}")


def check(condition, message):
    """Validate a config value: one line and exit if the condition does not hold."""
    if not condition:
        fail(message)

