"""Command-line checks: config keys (train.py, eval.py; before absl parses the flags), numbers
and one-line errors (the ``python -m vim_jax.*`` commands)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import sys


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _dotted_keys(config, prefix="") -> list[str]:
    import ml_collections

    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _dotted_keys(v, f"{prefix}{k}.")
    return keys


def _load(path_and_arg: str):
    path, _, arg = path_and_arg.partition(":")
    spec = importlib.util.spec_from_file_location("_vim_jax_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_config_key(argv, default_config: str | None = None) -> str | None:
    """The error line for the first ``--config.KEY=...`` override whose KEY the config file
    (``--config``, else ``default_config``) does not have, naming the nearest keys; None if
    every key exists or the config cannot be loaded here (absl then reports the problem)."""
    argv = argv[:argv.index("--")] if "--" in argv else argv  # what follows is not ours
    overrides = [a.split(".", 1)[1].split("=", 1)[0] for a in argv
                 if a.startswith(("--config.", "--noconfig."))]
    path = _config_path(argv) or default_config
    if not overrides or not path:
        return None
    try:
        keys = _dotted_keys(_load(path))
    except Exception:  # noqa: BLE001 - a missing or broken file is absl's to report
        return None
    for key in overrides:
        if key not in keys:
            section, _, leaf = key.rpartition(".")
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            near += [k for k in keys if k.rpartition(".")[2] == leaf and k not in near]
            # The config's own spelling of common words: "lr" for a learning rate.
            short = leaf.replace("learning_rate", "lr")
            near += [k for k in keys if k.startswith(section + ".") and short != leaf
                     and k.rpartition(".")[2].endswith(short) and k not in near]
            if not near and section in keys:
                near = [k for k in keys if k.startswith(section + ".")]
            hint = ""
            if section.endswith("overrides") and section in keys:
                hint = (f"; {section} holds model arguments the config file sets: add "
                        f"{leaf} there (command-line overrides change existing keys)")
            return (f"error: unknown config key {key!r} (--config.{key}) in {path}"
                    + (f"; nearest: {', '.join(near[:8])}" if near else "") + hint)
    return None


def parse_flags(argv):
    """absl's flag parsing (usage on error), after the config key check."""
    from absl import app

    error = unknown_config_key(argv, _default_config())
    if error:
        sys.exit(error)
    return app.parse_flags_with_usage(argv)


def _default_config():
    from absl import flags

    try:
        return flags.FLAGS["config"].default_as_str.strip("'\"") or None
    except (KeyError, AttributeError):
        return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, ``PROG: error: ... (see --help)``, not
    after the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@contextlib.contextmanager
def one_line_errors(parser: argparse.ArgumentParser):
    """What a user's input gets wrong in a command (a missing file, a checkpoint that does not
    fit, a name or value not allowed, weights that cannot be fetched) ends the command with one
    line, ``PROG: error: ...`` saying what to do, and exit status 2, as argparse's own errors;
    a checkpoint mismatch's key list is cut to its first entry."""
    from vim_jax.weights.checkpoints import CheckpointError
    from vim_jax.weights.hub import WeightsUnavailableError

    try:
        yield
    except (ValueError, FileNotFoundError, CheckpointError, WeightsUnavailableError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        first = lines[0].rstrip(":") + (f" (first: {lines[1]})" if len(lines) > 1 else "")
        parser.exit(2, f"{parser.prog}: error: {first}\n")


def positive(kind):
    """An argparse ``type``: ``kind`` (int or float) > 0, else an argument error naming it."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number ({kind.__name__})") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse
