"""`myshop products import FILE.jsonl`."""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from myshop_ops.adapters.embeddings import EmbeddingError, Provider, make_provider
from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL, EXIT_UNAVAILABLE
from myshop_ops.cli.common import console, err_console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools.catalog import DEFAULT_BATCH_SIZE, BadLine, ImportResult, import_catalog
from myshop_ops.tools.lines import count_lines, open_regular
from myshop_ops.tools.migration import MigrationError, next_products

SHOWN_BAD = 20  # bad lines printed one by one; --json lists them all (up to catalog.MAX_REPORTED_BAD)


def import_products(
    path: Path = typer.Argument(..., metavar="FILE.jsonl", help="One JSON product per line.", show_default=False),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, max=2048,
                                   help="Products per provider request and bulk write."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (see above)."),
    next_model: bool = typer.Option(False, "--next", help="Under the next model of a model migration, into "
                                    "product_embeddings_next (`myshop model start`)."),
) -> None:
    """Embed a JSONL catalog into product_embeddings.

    One product per line: product_id, name, description, category, stock, price. Only new products and those
    whose text (name, category, description), model or dimensions changed are embedded; a product whose price or
    stock alone changed is updated without a provider call.

    Bad lines are reported on stderr with their line number and skipped; the exit code is then 1. A line longer
    than 1 MiB is bad and never read whole; so is a product the provider refuses to embed.

    Prints one summary line: FILE: N embedded (new or changed text), N price/stock-only updates (not
    re-embedded), N unchanged, N bad line(s) skipped (MODEL, DIMENSIONSd). --json prints {"file", "model",
    "dimensions", "lines", "products", "imported" (embedded), "updated" (price/stock only), "unchanged", "bad",
    "bad_lines": [{"line", "error"}]}.
    """
    try:
        with open_regular(path):  # a FIFO or /dev/zero would never end; read_catalog checks its own descriptor
            pass
    except OSError as exc:
        fail(f"catalog {path}: {exc.strerror or exc} (give a JSONL file, one product per line)", EXIT_CONFIG)
    s = settings(embeds=True)
    with operator_errors(s):
        store = Store.from_settings(s)
        if next_model:
            try:
                s, store = next_products(s, store)
            except MigrationError as exc:
                fail(f"--next: {exc}", EXIT_FAIL)
        provider = make_provider(s)
        try:
            result = _run(path, store, provider, batch_size, as_json, s.store_layout)
        except EmbeddingError as exc:
            fail(f"embeddings provider failed ({s.model}): {exc}; batches already stored are kept, re-run to resume",
                 EXIT_UNAVAILABLE if exc.transient else EXIT_FAIL)
        except OSError as exc:  # the file changed under us (replaced by a FIFO, removed...)
            fail(f"catalog {path}: {exc.strerror or exc} (give a JSONL file, one product per line)", EXIT_CONFIG)
        finally:
            store.close()
    if as_json:
        print_json({"file": str(path), **result.as_dict()})
    else:
        _summary(path, result)
    if result.bad:
        raise typer.Exit(EXIT_FAIL)


def _run(path: Path, store: Store, provider: Provider, batch_size: int, quiet: bool, layout: str) -> ImportResult:
    """The import with feedback: a progress bar on a terminal, a line per batch on stderr otherwise, none with
    --json."""
    printed = 0
    run = functools.partial(import_catalog, path, store, provider, batch_size=batch_size, layout=layout)

    def bad(line: BadLine) -> None:
        nonlocal printed
        printed += 1
        if not quiet and printed <= SHOWN_BAD:
            err_console.print(f"[yellow]line {line.line}:[/] {shown(line.error)}", highlight=False, soft_wrap=True)

    if quiet:
        return run(on_bad=bad)
    if not console.is_terminal:
        def plain(r: ImportResult) -> None:  # progress on stderr: stdout holds the one summary line
            err_console.print(f"importing: {r.lines} lines read", highlight=False, soft_wrap=True)

        return run(on_bad=bad, on_batch=plain)
    with open_regular(path) as fh:
        total = count_lines(fh)  # in chunks: a huge line is never held
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TextColumn("lines"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("import", total=total)
        result = run(on_bad=bad, on_batch=lambda r: progress.update(task, completed=r.lines))
        progress.update(task, completed=total)
    return result


def _summary(path: Path, r: ImportResult) -> None:
    if r.bad > SHOWN_BAD:
        err_console.print(f"[yellow]... {r.bad - SHOWN_BAD} more bad lines (--json lists them)[/]", highlight=False)
    console.print(
        f"{shown(path)}: {r.imported} embedded (new or changed text), {r.updated} price/stock-only updates (not "
        f"re-embedded), {r.unchanged} unchanged, {r.bad} bad line(s) skipped ({r.model}, {r.dimensions}d)",
        highlight=False,
        soft_wrap=True,  # one line however long the path: pipes and grep see it whole
    )
