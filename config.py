"""
Config loading shared by every stage script, nanoGPT style.

A script defines its defaults as plain top-level variables, then calls

    config = load_config(defaults, sys.argv[1:])

where argv may hold config files (plain Python files whose top-level variables
override the defaults; they may `from configs.other import *`) and --key=value
overrides, applied left to right. An unknown key or a value of the wrong type
stops the script with one line on stderr naming it.
"""
import ast
import os
import runpy
import sys
import types

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_TYPES = (bool, int, float, str, type(None), list, tuple, dict)


class ConfigError(Exception):
    pass


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


def _parse_value(text):
    """'3e-4' -> 3e-4, 'True' -> True, 'out/x' -> 'out/x' (anything not a Python literal is a string)."""
    lowered = text.lower()
    if lowered in ('true', 'false'):
        return lowered == 'true'
    if lowered in ('none', 'null'):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key, value, default, source):
    """Type-check value against the default's type; ints are accepted where floats are expected."""
    if default is None or value is None and default is None:
        return value
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if expected is tuple and type(value) is list or expected is list and type(value) is tuple:
        return expected(value)
    if type(value) is not expected:
        raise ConfigError(f"{source}: {key} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _read_config_file(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if REPO_ROOT not in sys.path:  # lets a config file `from configs.base import *`
        sys.path.insert(0, REPO_ROOT)
    try:
        namespace = runpy.run_path(path)
    except Exception as e:
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def load_config(defaults, argv):
    """Apply config files and --key=value overrides (in order) to a copy of defaults."""
    config = dict(defaults)
    try:
        for arg in argv:
            if arg.startswith('--'):
                key, sep, text = arg[2:].partition('=')
                if not sep:
                    raise ConfigError(f"override {arg!r} must look like --key=value")
                updates, source = {key: _parse_value(text)}, 'command line'
            else:
                updates, source = _read_config_file(arg), arg
            for key, value in updates.items():
                if key not in defaults:
                    raise ConfigError(f"unknown config key {key!r} ({source})")
                config[key] = _coerce(key, value, defaults[key], source)
    except ConfigError as e:
        fail(str(e))
    return config


def check(condition, message):
    """Validate a config value: one line and exit if the condition does not hold."""
    if not condition:
        fail(message)


def check_choice(config, key, choices):
    check(config[key] in choices, f"{key} must be one of {', '.join(map(repr, choices))}, got {config[key]!r}")
