"""PLACEHOLDER (being written): `saejax sweep`."""


def add_arguments(parser):
    parser.add_argument("study")


def main(args, overrides) -> int:
    raise NotImplementedError
