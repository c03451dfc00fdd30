"""MLflow runs -> pandas tables and plots: the README's results (`make table`), the `python -m
analysis` CLI and the notebooks in analysis/notebooks/ all use these functions. The record's keys,
tags and default store are soda.tracking's."""

from analysis.bench import BenchRegenerated, bench_markdown, regenerate_bench
from analysis.plots import (
    ablation_figure,
    png_bytes,
    probe_curves,
    probe_curves_figure,
    row_labels,
    save_plots,
    write_png,
)
from analysis.readme import Regenerated, regenerate_readme, replace_section, results_markdown
from analysis.runs import (
    AnalysisError,
    describe_selection,
    duplicate_trials,
    exclusion_note,
    finished_runs,
    load_history,
    load_runs,
    open_store,
    provenance,
    require_results,
    select_runs,
    sweep_parents,
)
from analysis.tables import Table, ablation_table, configuration_params, format_table, main_table, summarize

__all__ = [
    "AnalysisError",
    "BenchRegenerated",
    "Regenerated",
    "Table",
    "ablation_figure",
    "ablation_table",
    "bench_markdown",
    "configuration_params",
    "describe_selection",
    "duplicate_trials",
    "exclusion_note",
    "finished_runs",
    "format_table",
    "load_history",
    "load_runs",
    "main_table",
    "open_store",
    "png_bytes",
    "probe_curves",
    "probe_curves_figure",
    "provenance",
    "regenerate_bench",
    "regenerate_readme",
    "replace_section",
    "require_results",
    "results_markdown",
    "row_labels",
    "save_plots",
    "select_runs",
    "summarize",
    "sweep_parents",
    "write_png",
]
