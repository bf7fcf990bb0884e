"""``python -m hybridseg <command>``: one fire command per tool; ``--help`` on each."""

from __future__ import annotations

import functools
import sys

import fire

from hybridseg.data.busi import datalist_busi
from hybridseg.data.synapse import datalist_synapse
from hybridseg.io import InputDataError
from hybridseg.tools.bench import bench
from hybridseg.tools.demo import demo
from hybridseg.tools.export import export
from hybridseg.tools.package import package
from hybridseg.tools.synth_busi import synth_busi
from hybridseg.tools.synth_synapse import synth_synapse
from hybridseg.tools.transunet import convert_transunet
from hybridseg.tools.weights import fetch, list_weights


def _quiet(fn):
    """The command without its return value, which fire would print after the command's own output."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        fn(*args, **kwargs)

    return run


def _clean_errors(fn):
    """The command with a bad-input error printed as one line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except InputDataError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return run


COMMANDS = {
    "synth_busi": synth_busi,
    "synth_synapse": synth_synapse,
    "datalist_busi": datalist_busi,
    "datalist_synapse": datalist_synapse,
    "convert_transunet": convert_transunet,
    "demo": demo,
    "bench": _quiet(bench),
    "export": _quiet(export),
    "package": _quiet(package),
    "weights": {"fetch": _clean_errors(fetch), "list": _clean_errors(list_weights)},
}

# Flags that take several values. fire reads ``--shape 64 64 24`` as ``--shape 64`` plus two stray
# positional arguments (silently shifting them into other parameters), so such runs are rewritten to
# ``--shape=[64, 64, 24]`` before fire sees them.
MULTI_VALUE_FLAGS = (
    "--shape",
    "--split",
    "--classes",
    "--test_cases",
    "--test-cases",
    "--synapse_shape",
    "--networks",
    "--dtypes",
    "--input_shape",
    "--settings",
    "--batches",
    "--only",
)


def _literal(token: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token


def normalise_argv(argv: list[str]) -> list[str]:
    """Collect the space-separated values after a multi-value flag into one list literal for fire.

    A run ends at the next token starting with ``--`` (negative numbers such as ``-1`` are values).
    ``--flag=value`` and a flag followed by a single value are left as they are.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in MULTI_VALUE_FLAGS:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values = argv[i + 1 : j]
            if len(values) > 1:
                out.append(f"{tok}={[_literal(v) for v in values]!r}")
            else:
                out.extend(argv[i:j])
            i = j
        else:
            out.append(tok)
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """Run one command; ``argv`` defaults to the process arguments."""
    args = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    fire.Fire(COMMANDS, command=args, name="hybridseg")


if __name__ == "__main__":
    main()
