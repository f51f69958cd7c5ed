"""The ``crepe`` command line: one thin door into the tasks and flows.

Each command loads the configuration (``--params`` plus ``-S``; flags such as ``--method`` are sugar for
``-S``, :mod:`flows.cli_args`) and calls a task (:mod:`flows.cli_prune`, :mod:`flows.cli_search`) or a flow
(:mod:`flows.cli_ops`). User errors print one sentence to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flows.runtime import prefect_env

RESUMABLE = ("search", "hill-climb", "proxy-study")


def _params_of(argv: Sequence[str]) -> str:
    """The ``--params`` value of ``argv`` (default params.yaml), read before argparse runs."""
    for i, arg in enumerate(argv):
        if arg == "--params" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--params="):
            return arg.split("=", 1)[1]
    return "params.yaml"


def _project_env(argv: Sequence[str]) -> None:
    """Prefect reads its settings when it is first imported, and every task module imports it: point
    ``PREFECT_HOME`` and the result storage at the project of ``--params`` before anything else loads."""
    from tasks.config import project_root_of  # imports no prefect

    params = Path(_params_of(argv))
    prefect_env(project_root_of(params) if params.is_file() else Path.cwd())


def build_parser():  # noqa: ANN201 - argparse.ArgumentParser, imported late with the commands
    from flows import cli_ops, cli_prune, cli_search  # late: Prefect's environment is set first
    from flows.cli_args import Parser  # late: Prefect's environment is set first

    parser = Parser(prog="crepe", description="Post-training pruning of LLMs with CRePE and baselines.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    cli_prune.add_parsers(sub)
    cli_search.add_parsers(sub)
    cli_ops.add_parsers(sub)
    return parser


def commands() -> dict:
    from flows import cli_ops, cli_prune, cli_search  # late: Prefect's environment is set first

    return {"prune": cli_prune.cmd_prune, "eval": cli_prune.cmd_eval, "demo": cli_prune.cmd_demo,
            "table": cli_prune.cmd_table, "methods": cli_prune.cmd_methods,
            "search": cli_search.cmd_search, "hill-climb": cli_search.cmd_hill_climb,
            "proxy-study": cli_search.cmd_proxy_study,
            "config": cli_ops.cmd_config, "prepare": cli_ops.cmd_prepare, "verify": cli_ops.cmd_verify,
            "ui": cli_ops.cmd_ui, "pipeline": cli_ops.cmd_pipeline, "transfer": cli_ops.cmd_transfer,
            "schedule": cli_ops.cmd_schedule}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _project_env(argv)
    from crepe import __version__  # late: Prefect's environment is set first
    from crepe.errors import CrepeError  # late: Prefect's environment is set first

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"crepe {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return commands()[args.command](args)
    except CrepeError as exc:
        sys.stderr.write(f"crepe: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("crepe: interrupted" + ("; rerun the same command to resume\n" if args.command in RESUMABLE
                                                 else "\n"))
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
