"""
nanoGPT's "poor man's configurator", as a function.

    nanofast-train config/train_shakespeare_char.py --batch_size=32 --compile=False

first runs the config file (plain Python assigning some of the keys), then applies each
--key=value override, as nanoGPT's configurator.py does:

- An argument without '=' names a config file. It is looked up as a path (relative to the current
  directory), then among the files shipped in nanofast/config/ (by "config/NAME.py", "NAME.py" or
  "NAME"), so nanoGPT's `config/train_shakespeare_char.py` works from any directory.
- --key=value: the value is read with ast.literal_eval (so 3, 1e-3, True, 'x' work) and falls back
  to the raw string; it must have the type of the key's default. Friendlier than nanoGPT in a few
  cases: an int is accepted for a float key (--learning_rate=1), a whole float for an int key
  (--max_iters=2e3), true/false in any case for a bool key, and any text for a str key
  (--out_dir=2024 stays the string '2024').
- An unknown key or a value of the wrong type, on the command line or in a config file: a
  ConfigError naming the valid keys.
- -h / --help: ConfigHelp (whose message lists the keys and their defaults).
"""
from __future__ import annotations

import ast
import difflib
import os
import sys
import types
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "config"


class ConfigError(ValueError):
    """A bad config file or --key=value argument; the message names the valid keys."""


class ConfigHelp(Exception):
    """Raised for -h/--help; str(exc) is the help text."""


def run_cli(prog: str, body, failures: tuple = ()) -> int:
    """The exit status of a command-line tool whose work is body() (which returns a status or None):
    help printed and 0; a ConfigError (bad arguments) 2; one of `failures` (bad data, a missing
    checkpoint: the run itself failed) 1; an interrupt 130. Each error is one line on stderr."""
    try:
        status = body()
    except ConfigHelp as h:
        print(h)
        return 0
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else status


def shipped_configs() -> list[str]:
    """Names of the config files shipped in nanofast/config/."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.name for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_config_file(name: str) -> Path:
    """The config file meant by `name`: an existing path, else a file shipped with nanofast."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    base = Path(name).name
    candidates = [CONFIG_DIR / base]
    if not base.endswith(".py"):
        candidates.append(CONFIG_DIR / (base + ".py"))
    for c in candidates:
        if c.is_file() and not c.name.startswith("_"):
            return c
    raise ConfigError(f"config file {name!r} not found (neither as a path from {os.getcwd()} nor among the "
                      f"files shipped in {CONFIG_DIR}: {', '.join(shipped_configs()) or 'none'})")


def _type_name(t) -> str:
    return t.__name__


def _keys_listing(defaults: dict) -> str:
    return ", ".join(defaults)


def _unknown_key(key: str, defaults: dict, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(defaults), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}).{hint}\nValid keys: {_keys_listing(defaults)}")


def coerce(key: str, value, default, where: str):
    """`value` as the type of `default`, or a ConfigError."""
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    elif default is None or isinstance(value, want):
        return value
    raise ConfigError(f"{key} must be a {_type_name(want)} (default {default!r}), got {value!r} "
                      f"of type {type(value).__name__} ({where})")


def parse_value(key: str, raw: str, default):
    """A command-line value: literal_eval, else the raw string; then coerced to the default's type."""
    if isinstance(default, str):
        # a string key takes the text as given, also when it parses as something else
        try:
            v = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            return raw
        return v if isinstance(v, str) else raw
    try:
        v = ast.literal_eval(raw)
    except (SyntaxError, ValueError):
        v = raw
    return coerce(key, v, default, f"--{key}={raw}")


def help_text(defaults: dict, prog: str, doc: str = "") -> str:
    lines = [f"usage: {prog} [CONFIG_FILE ...] [--key=value ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    lines.append("keys (default):")
    width = max(len(k) for k in defaults)
    for k, v in defaults.items():
        lines.append(f"  --{k:<{width}} = {v!r}")
    cfgs = shipped_configs()
    if cfgs:
        lines += ["", "config files shipped with nanofast (usable from any directory): " + ", ".join(cfgs)]
    return "\n".join(lines)


def run_config_file(path: Path, config: dict, defaults: dict) -> list[tuple[str, object]]:
    """Execute a config file against `config`; returns the (key, value) pairs it set."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    namespace = dict(config)  # a config file may read the current values, as with nanoGPT's exec
    before = dict(namespace)
    try:
        exec(compile(source, str(path), "exec"), namespace)
    except Exception as e:
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    changed = []
    for k, v in namespace.items():
        if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
            continue
        if k not in defaults:
            raise _unknown_key(k, defaults, f"set in config file {path}")
        if k in before and before[k] is v:
            continue
        changed.append((k, coerce(k, v, defaults[k], f"in config file {path}")))
    return changed


def configure(defaults: dict, argv: list[str], default_config_file: str | None = None, verbose: bool = True,
              prog: str = "nanofast", doc: str = "") -> dict:
    """The configuration for `argv`: `defaults`, updated by config files, then by --key=value.

    default_config_file: applied first when argv names no config file (nanofast-train uses it so that
    running with no arguments trains a small model).
    """
    config = dict(defaults)
    files, overrides = [], []
    for arg in argv:
        if arg in ("-h", "--help"):
            raise ConfigHelp(help_text(defaults, prog, doc))
        if "=" not in arg:
            if arg.startswith("-"):
                raise ConfigError(f"argument {arg!r}: options are written --key=value "
                                  f"(e.g. --{arg.lstrip('-')}=...).\nValid keys: {_keys_listing(defaults)}")
            files.append(arg)
        else:
            if not arg.startswith("--"):
                raise ConfigError(f"argument {arg!r}: options are written --key=value.\n"
                                  f"Valid keys: {_keys_listing(defaults)}")
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise _unknown_key(key, defaults, f"in {arg!r}")
            overrides.append((key, raw, arg))

    # check every override before running anything, so that a typo fails fast and quietly
    values = [(key, parse_value(key, raw, defaults[key])) for key, raw, arg in overrides]
    implicit = not files and bool(default_config_file)
    if implicit:
        files = [default_config_file]
    for name in files:
        path = resolve_config_file(name)
        if verbose:
            if implicit:
                print(f"no config file given: using {path}")
            else:
                print(f"Overriding config with {path}:")
                print(path.read_text(encoding="utf-8"))
        for k, v in run_config_file(path, config, defaults):
            config[k] = v
    for key, value in values:
        if verbose:
            print(f"Overriding: {key} = {value!r}")
        config[key] = value
    return config
