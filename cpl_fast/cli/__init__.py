"""The command-line programs of cpl_fast (``cpl-train``, ``cpl-eval``, ``cpl-restore``, ``cpl-analyze``,
``cpl-export``, ``cpl-data``, ``cpl-convert``, ``cpl-info``), one module each, on the shared pieces of
:mod:`cpl_fast.cli.common`.

Nothing is imported here: ``cpl-<command> --help`` must answer without loading torch.
"""
