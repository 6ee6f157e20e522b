"""`python -m fnf_kernels info | selftest`: which backends are active (and why the others are not); every
available backend of every op checked against its float64 reference on this machine."""
import argparse
import sys

from . import selftest
from .backends import info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fnf_kernels",
                                     description="fnf_kernels utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print which backends are active for each op and why the others are not")
    check = sub.add_parser("selftest", help="run every available backend of every op against its float64 "
                                            "reference on this device; print one table, exit 1 on a mismatch")
    selftest.add_arguments(check)
    args = parser.parse_args(argv)
    if args.command == "selftest":
        return selftest.main(args)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
