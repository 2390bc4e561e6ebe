"""What the command-line tools share: a user's mistake ends as one ``error:`` line.

Flag-free and light (no jax, no TensorFlow): the tools import it first, so that a flag or
input mistake is reported before anything heavy is imported or built.
"""
from __future__ import annotations

import contextlib
import os
import sys

# What a user can get wrong (config values, paths, files, checkpoints): one "error:" line.
# UNIMM_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def one_line(e: BaseException | str) -> str:
    """The message of ``e`` on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(e).split())


@contextlib.contextmanager
def user_errors():
    """``with user_errors(): ...``: a USER_ERRORS exception exits with ``error: <message>``."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("UNIMM_TRACEBACK"):
            raise
        from absl import logging
        logging.error("%s: %s", type(e).__name__, one_line(e))
        sys.exit(f"error: {one_line(e)}")


def _flag_error_message(e: Exception, argv=()) -> str:
    message = str(e)
    if "Error whilst parsing config file:" in message and "Traceback" in message:
        # config_flags embeds the config file's whole traceback: keep its last line.
        head = message.split(": Error whilst parsing config file:")[0]
        last = [line.strip() for line in message.replace("\\n", "\n").splitlines() if line.strip()][-1]
        message = f"{head}: {last}"
    message = " ".join(message.replace("\\n", " ").replace("\\'", "").replace("'", "").split()).strip('"')
    if isinstance(e, (AttributeError, KeyError)):   # config_flags: a path that is not a field
        message = f"unknown config field in the --config.* overrides: {_unknown_override(message, argv)}"
    return message


def _unknown_override(name: str, argv) -> str:
    """The override path that holds the unknown field ``name`` (config_flags names only the
    field), and where a field of an older layout lives now."""
    from unimm import schema   # light: ml_collections only
    field, _, rest = name.partition(" ")   # rest: config_flags' "Did you mean ..."
    for arg in argv:
        path = arg[len("--config."):].partition("=")[0] if arg.startswith("--config.") else ""
        if field in path.split("."):
            moved = schema.moved_grpo_field(field) if path == f"grpo.{field}" else None
            return " ".join(filter(None, [path, f"(now {moved})" if moved else "", rest]))
    return name


def parse_flags(argv):
    """absl's parser (``app.run(main, flags_parser=parse_flags)``) with flag mistakes (missing
    or mistyped flags; for config flags unknown fields, wrong types, an unreadable config
    file) as one ``error:`` line instead of absl's usage dump or a traceback."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: {_flag_error_message(e, argv)}")
    if "config" in flags.FLAGS:
        try:   # config_flags reports a config file it could not load only when it is read
            value = flags.FLAGS.config
            if value is not None and not isinstance(value, str):
                value.keys()
        except OSError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            sys.exit(f"error: --config: cannot load the config file ({lines[-1]})")
    return rest


def check_writable_dir(path: str, label: str) -> None:
    """Creates ``path`` if needed and proves it writable; PermissionError ``<label> is not a
    writable directory (...)`` otherwise. Checked before anything is built or converted."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{label} is not a writable directory ({e.strerror or e})") from None


def check_positive(**values: int | float | None) -> None:
    """``check_positive(num_per_prompt=FLAGS.num_per_prompt)``: None (= default) or > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"--{name}={value}: expected a number > 0")


def validate_config(config) -> None:
    """Checks that are cheap and otherwise happen only deep inside a run (some only when the
    first train step is traced): ``unimm.resolve.validate``, imported only now (jax)."""
    from unimm import resolve

    resolve.validate(config)
