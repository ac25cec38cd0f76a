"""PLACEHOLDER (being written): `saejax fit SWEEP_DIR`."""


def add_arguments(parser):
    parser.add_argument("sweep_dir")


def main(args) -> int:
    raise NotImplementedError
