"""nanofast-compare's command line: config files and --key=value overrides as nanofast-train takes
them, plus the two targets (positional arguments or --targets=A,B); its help is nanofast.compare's
docstring."""
from __future__ import annotations

import os
import sys

import nanofast.compare
from nanofast.compare.running import COMPARE_DEFAULTS, compare
from nanofast.compare.targets import TargetError, parse_target, split_targets
from nanofast.configurator import ConfigError, configure, resolve_config_file, run_cli
from nanofast.data import DataError
from nanofast.train import DEFAULT_CONFIG_FILE, DEFAULTS, validate_config


def _is_config_file(arg):
    if arg.endswith('.py') or os.path.sep in arg:
        return True
    try:
        resolve_config_file(arg)
        return True
    except ConfigError:
        return False


def parse_args(argv):
    """(config, target specs) for command-line arguments: config files and --key=value overrides as
    nanofast-train takes them, plus targets as positional arguments or --targets=A,B."""
    positional_targets, rest = [], []
    for arg in argv:
        if arg.startswith('-'):
            rest.append(arg)
        elif '=' in arg:  # kernels=torch, device=cuda:dtype=bf16
            positional_targets.append(arg)
        elif _is_config_file(arg):
            rest.append(arg)
        else:
            parse_target(arg)  # a TargetError names the grammar if it is neither a file nor a target
            positional_targets.append(arg)
    defaults = dict(DEFAULTS)
    defaults.update(COMPARE_DEFAULTS)
    config = configure(defaults, rest, default_config_file=DEFAULT_CONFIG_FILE, verbose=True, prog='nanofast-compare',
                       doc=nanofast.compare.__doc__.strip())
    validate_config(config)
    specs = split_targets(config['targets'])
    if specs and positional_targets:
        raise TargetError("give the targets either as positional arguments or as --targets=A,B, not both")
    return config, specs or positional_targets


def main(argv=None):
    """Entry point of `nanofast-compare`: 0 done (whatever the verdict), 2 bad arguments, 1 data errors."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def body():
        config, specs = parse_args(argv)
        for s in specs:
            parse_target(s)
        compare(config, targets=specs)

    return run_cli('nanofast-compare', body, failures=(DataError,))  # TargetError is a ConfigError
