"""`python -m fnf_kernels info`: which backends are active for each op and why the others are not."""
import argparse
import sys

from .backends import info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fnf_kernels",
                                     description="fnf_kernels utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print which backends are active for each op and why the others are not")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
