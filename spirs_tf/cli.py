"""The ``spirs`` command: one verb per sub-command, each a thin wrapper around a typed function.

Sub-commands live in :mod:`spirs_tf.commands`, one module each, exposing ``add_parser(subparsers)``
and ``run(args) -> int``. Evaluation and the paper's tables are scripts: ``experiments/evaluate.py`` and
its siblings (``experiments/make_results.sh``).

Errors in user input are printed as a single line ``spirs: error: <file>: <problem>`` with exit
code 2; no traceback is shown (set ``SPIRS_DEBUG=1`` to see one). The same holds for what the file
system refuses (``OSError``: an output path under a file, a full disk, no permission) and for running
out of memory. See docs/troubleshooting.md.

XLA compile cache: before anything imports TensorFlow, :func:`main` keeps XLA's compiled code (the
test-time refinement's optimisation steps, :mod:`spirs_tf.refine`) in ``~/.cache/spirs-tf/xla``
(``$XDG_CACHE_HOME/spirs-tf/xla``), so a later ``spirs predict`` skips the compilation. The
environment variable ``SPIRS_XLA_CACHE`` relocates it (a folder) or turns it off (``off``, ``0``,
``none``, ``false`` or empty).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# TensorFlow's C++ log level (an explicit TF_CPP_MIN_LOG_LEVEL is kept). 3 hides its ERROR lines too:
# XLA's CPU loader logs six per compiled function that it loads from spirs' XLA cache ("Target machine
# feature +prefer-no-gather is not supported on the host machine ... could lead to execution errors such
# as SIGILL") although the entry was compiled on this very machine: it checks LLVM tuning flags as if
# they were instruction sets (openxla/xla#44565). The entries do load (refinement of a 64³ case: 7-9 s
# with the cache, 13-14 s without). Errors that matter reach Python as exceptions; SPIRS_DEBUG=1 shows
# the C++ lines again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if os.environ.get("SPIRS_DEBUG") else "3")

from spirs_tf import __version__  # noqa: E402
from spirs_tf.errors import SpirsInputError  # noqa: E402

#: (sub-command, module) in the order ``spirs --help`` lists them.
COMMANDS = (
    ("demo", "spirs_tf.commands.demo"),
    ("predict", "spirs_tf.commands.predict"),
    ("synth", "spirs_tf.commands.synth"),
    ("manifest", "spirs_tf.commands.manifest"),
    ("train", "spirs_tf.commands.train"),
    ("export", "spirs_tf.commands.export"),
)


def available_commands():
    for name, module in COMMANDS:
        yield name, importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spirs",
        description="SPIRS: joint registration and segmentation of brain metastases on longitudinal MRI.")
    parser.add_argument("--version", action="version", version=f"spirs-tf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, module in available_commands():
        module.add_parser(sub)
    return parser


def _tolerate_undecodable_paths() -> None:
    """Let stdout print any file name instead of failing with UnicodeEncodeError (it is 'strict'
    outside Python's UTF-8 mode): a name that is not valid UTF-8 (held by Python as lone surrogates)
    is printed as its original bytes, a character the terminal's encoding lacks as an escape
    (Python's own stderr already uses 'backslashreplace'; a replaced stream may not)."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            utf8 = str(getattr(stream, "encoding", "")).lower().replace("-", "").replace("_", "") == "utf8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")


def _quiet_file_readers() -> None:
    """Keep nibabel's warnings and header-repair log lines ("Extension size is not a multiple of 16
    bytes", "pixdim[1,2,3] should be non-zero") off the terminal: spirs validates what it reads and
    reports a problem in its own one-line error. ``SPIRS_DEBUG=1`` shows them."""
    if os.environ.get("SPIRS_DEBUG"):
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"nibabel(\.|$)")
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)


#: ``SPIRS_XLA_CACHE`` values that turn the XLA compile cache off.
XLA_CACHE_OFF = ("", "0", "off", "none", "false", "no")


def _enable_xla_cache() -> str | None:
    """Enable :func:`spirs_tf.xla_cache.enable_compile_cache` unless ``SPIRS_XLA_CACHE`` turns it off
    (module docstring); a no-op once TensorFlow is imported. Returns the folder in use or None."""
    from spirs_tf.xla_cache import enable_compile_cache

    value = os.environ.get("SPIRS_XLA_CACHE")
    if value is not None and value.strip().lower() in XLA_CACHE_OFF:
        return None
    if "tensorflow" in sys.modules:
        return None
    return enable_compile_cache(value or None)


def main(argv: list[str] | None = None) -> int:
    _enable_xla_cache()  # before TensorFlow is imported
    _tolerate_undecodable_paths()
    _quiet_file_readers()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpirsInputError as exc:
        if os.environ.get("SPIRS_DEBUG"):
            raise
        print(f"spirs: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: output under a file, disk full, no permission, ...
        if os.environ.get("SPIRS_DEBUG"):
            raise
        where = ": ".join(os.fspath(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"spirs: error: {where + ': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except MemoryError:
        if os.environ.get("SPIRS_DEBUG"):
            raise
        print("spirs: error: out of memory; use a smaller --batch-size or a machine with more RAM", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spirs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
