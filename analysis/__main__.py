"""python -m analysis: the result tables in the terminal (text, Markdown, CSV, LaTeX), the plots,
and the README's results section (what `make table` runs).

    python -m analysis main                                   # the main table, every experiment
    python -m analysis main --experiment soda --format latex
    python -m analysis ablation --study augment_ablation-demo # sweep=augment_ablation experiment=demo
    python -m analysis main --sweep lr_search --param model.name=tiny --format csv
    python -m analysis learning --experiment soda-demo       # sweep learning_study: gap, factor probes
    python -m analysis plots --out docs/results
    python -m analysis readme                                 # = make table
    python -m analysis bench                                  # docs/performance.md from bench/results/*.json

Paths are relative to where you run it (`make table` runs from the repository root), and so is the
default store: soda.tracking's, `mlflow.db` in the working directory, as the runs write it.
Tables go to stdout, notes (which runs, what was left out) to stderr. A problem is one line,
`error: ...`, on stderr, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.bench import PERFORMANCE_DOC, RESULTS_DIR, regenerate_bench
from analysis.learning import LEARNING_STUDY, learning_keys, learning_table
from analysis.plots import save_plots
from analysis.readme import regenerate_readme
from analysis.runs import (
    AnalysisError,
    describe_selection,
    finished_runs,
    load_history,
    load_runs,
    parse_pairs,
    provenance,
    require_results,
    select_runs,
)
from analysis.tables import ABLATION_STUDY, FORMATS, ablation_table, format_table, main_table
from soda.record import STUDY
from soda.store import STORE_DIR_ENV, TRACKING_URI_ENV, default_tracking_uri, redact


def build_parser() -> argparse.ArgumentParser:
    # Which runs: the options every table and plot command shares.
    selection = argparse.ArgumentParser(add_help=False)
    group = selection.add_argument_group("which runs")
    group.add_argument(
        "--tracking-uri",
        help=f"MLflow store to read: sqlite:///file.db, http://host:5000, ... (default: ${TRACKING_URI_ENV}, else "
        f"mlflow.db in ${STORE_DIR_ENV} or in the directory you run this in, as runs launched there write it; here: "
        f"{redact(default_tracking_uri())})",
    )
    group.add_argument(
        "--experiment",
        action="append",
        metavar="NAME",
        help="an MLflow experiment to read (repeat for several; default: every experiment)",
    )
    group.add_argument("--sweep", metavar="STUDY", help=f"only the trials of this sweep (their tag {STUDY})")
    group.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with this tag (repeatable)"
    )
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs with this config value, dotted as in overrides, e.g. model.name=tiny (repeatable)",
    )

    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Result tables and plots from the MLflow runs. Failed and unfinished runs and sweep "
        "parents are left out of every table and counted in a note.",
    )

    # The commands: tables and plots from the runs, then the pages regenerated from them.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    main = commands.add_parser("main", parents=[selection], help="the main table: one row per configuration")
    main.add_argument("--format", choices=FORMATS, default="text")
    ablation = commands.add_parser("ablation", parents=[selection], help="the augmentation ablation's table")
    ablation.add_argument("--study", default=ABLATION_STUDY, help="the ablation's sweep (default: %(default)s)")
    ablation.add_argument("--format", choices=FORMATS, default="text")
    learning = commands.add_parser(
        "learning", parents=[selection], help="what the latent learns: latent gap and factor probes per setting"
    )
    learning.add_argument("--study", default=LEARNING_STUDY, help="the study's sweep (default: %(default)s)")
    learning.add_argument("--format", choices=FORMATS, default="text")
    plots = commands.add_parser("plots", parents=[selection], help="write the probe-curve and ablation PNGs")
    plots.add_argument("--study", default=ABLATION_STUDY, help="the ablation's sweep (default: %(default)s)")
    plots.add_argument(
        "--out",
        type=Path,
        default=Path("docs") / "results",
        help="folder for the PNG files (default: %(default)s, relative to where you run this)",
    )
    readme = commands.add_parser(
        "readme",
        aliases=["table"],
        parents=[selection],
        help="regenerate README.md's results section and its plots (make table)",
    )
    readme.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help="the README to update (default: %(default)s in the directory you run this in; make table runs it "
        "from the repository root)",
    )
    readme.add_argument("--study", default=ABLATION_STUDY, help="the ablation's sweep (default: %(default)s)")
    readme.add_argument("--out", type=Path, help="folder for the PNG files (default: docs/results beside the README)")
    bench = commands.add_parser(
        "bench",
        help="regenerate docs/performance.md's measured figures from bench/results/*.json (make table)",
    )
    bench.add_argument(
        "--doc",
        type=Path,
        default=PERFORMANCE_DOC,
        help="the page to update (default: %(default)s, relative to where you run this)",
    )
    bench.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="the folder of the JSON records (default: %(default)s)",
    )
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "bench":
        bench = regenerate_bench(args.doc, args.results)
        state = "updated" if bench.changed else "already up to date"
        used = ", ".join(str(path) for path in bench.records) or "none"
        print(f"{bench.doc}: bench figures {state}; records: {used}")
        return
    tags, params = parse_pairs(args.tag, "tag"), parse_pairs(args.param, "param")
    uri = args.tracking_uri or default_tracking_uri()
    if args.command in ("readme", "table"):
        result = regenerate_readme(args.readme, uri, args.experiment, args.sweep, tags, params, args.study, args.out)
        plots = ", ".join(str(path) for path in result.plots) or "none"
        state = "updated" if result.changed else "already up to date"
        runs = f"{result.runs} finished run{'s' if result.runs != 1 else ''}"
        print(f"{result.readme}: results section {state}, from {runs}; plots: {plots}")
        return

    selection = describe_selection(args.experiment, args.sweep, tags, params)
    runs = select_runs(load_runs(uri, args.experiment), sweep=args.sweep, tags=tags, params=params)
    require_results(runs, uri, selection)
    if args.command == "main":
        table, used = main_table(runs), runs
    elif args.command == "ablation":
        used = select_runs(runs, sweep=args.study)
        require_results(used, uri, describe_selection(args.experiment, args.study, tags, params))
        table = ablation_table(runs, args.study)
    elif args.command == "learning":
        used = select_runs(runs, sweep=args.study)
        finished = finished_runs(used)
        require_results(used, uri, describe_selection(args.experiment, args.study, tags, params))
        history = load_history(uri, finished["run_id"], learning_keys(finished)) if not finished.empty else None
        table = learning_table(runs, history, args.study)
    else:
        main = main_table(runs)
        has_ablation = not finished_runs(select_runs(runs, sweep=args.study)).empty
        written = save_plots(uri, main, ablation_table(runs, args.study) if has_ablation else None, args.out)
        for path in written.values():
            print(path)
        return
    sys.stdout.write(format_table(table, args.format))
    print(f"note: {table.title}, from {provenance(used)}", file=sys.stderr)
    for note in table.notes:
        print(f"note: {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
