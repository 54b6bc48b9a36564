"""The `phitrain` command line.

Each subcommand parses its arguments and calls one library function; there is no logic here. A
`PhitrainError` (bad input a user can fix) is printed as `error: ...` without a traceback, exit status 2.
Heavy imports (torch, sklearn, ...) happen inside the handlers so `phitrain --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from phitrain.errors import PhitrainError


# ---- model ---------------------------------------------------------------------------------------

def _model_info(args: argparse.Namespace) -> None:
    from phitrain.model.presets import describe_presets

    describe_presets(args.presets or None)


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model presets")
    s = p.add_subparsers(dest="model_cmd", required=True)
    info = s.add_parser("info", help="parameter counts and shapes of presets (computed on the meta device)")
    info.add_argument("presets", nargs="*", help="preset names (default: all)")
    info.set_defaults(func=_model_info)


# ---- main ----------------------------------------------------------------------------------------

_GROUPS = [_add_model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phitrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except PhitrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
