"""The ``neuroidx`` command. Subcommands: ``info``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuroidx", description="Index what the units of a trained CNN respond to.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices and the backends that loaded")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info_text

        print(info_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
