"""`fnf estimate-memory` (being written)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise NotImplementedError("fnf estimate-memory is being written")
