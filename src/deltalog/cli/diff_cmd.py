"""deltalog diff: what changed between two models, and by how much.

Each side is a replica directory (at its head), ``REPLICA@OFFSET`` (the
replica as it was at a retained offset), or a checkpoint (.npz,
.safetensors, a directory of .npy files). Two replicas of one model with
equal state digests are identical at once; with an offset where both held
the same model (an anchor), only the rows their logs wrote since are
compared, so the cost follows the change; anything else (a checkpoint, or
replicas whose histories cannot be tied together) is compared value by
value in bounded chunks. See deltalog.diff for the algorithm.

Exit status: 0 identical, 1 different (like diff(1)), 3 not a replica or
checkpoint, 6 different models (without --force), 7 offset not retained,
11 invalid input.

JSON output (``--json``, one object on stdout; numbers are over B - A in
float64; a value that is not finite is written as null):

    {
      "identical": bool,              # no changed row and nothing incomparable
      "changed_rows": int,            # rows whose bytes differ, all tensors
      "changed_buckets": int,         # buckets holding such rows
      "a_offset": int | null,         # offset of side A, null for a checkpoint
      "b_offset": int | null,
      "a": {"spec": str, "kind": "replica" | "checkpoint", "path": str,
            "model_id": str | null, "offset": int | null,
            "state_digest": str | null},  # 16 hex digits, the model at offset
      "b": {...same as "a"...},
      "method": "digest" | "same-offset" | "log" | "values",
                                      # how rows were found: equal state digests
                                      # or one offset of one replica (nothing to
                                      # read), the rows the logs wrote since the
                                      # anchor, or every row by value
      "anchor": int | null,           # "log": the offset both held alike
      "bucket_rows": int,             # rows per bucket used for changed_buckets
      "rows_compared": int,           # rows read and compared (the cost)
      "tensors": [                    # every tensor compared, by name
        {"name": str, "dtype": str, "shape": [int],
         "changed_rows": int, "changed_buckets": int, "rows_compared": int,
         "l2": float | null,          # sqrt(sum delta^2) over finite deltas (null past 1.8e308)
         "max_abs": float,            # max |delta| over finite deltas
         "significance": float,       # sum |delta| over finite deltas
         "nonfinite_rows": int,       # changed rows with a NaN/inf delta
         "zero_rows": int,            # changed bytes, equal numbers (-0.0 vs 0.0)
         "top": [{"row": int, "l2": float | null}],
                                      # up to --top rows, largest row l2 first
                                      # (a NaN/inf row first, with l2 null)
         "histogram": [{"log10": int, "count": int}]}
                                      # rows with 10^log10 <= row l2 < 10^(log10+1);
                                      # sum(count) + zero_rows + nonfinite_rows
                                      # == changed_rows
      ],
      "incomparable": [               # only with --force
        {"name": str, "reason": str,
         "a": {"dtype": str, "shape": [int]} | null, "b": {...} | null}
      ]
    }
"""

from __future__ import annotations

import click

from .console import Output, counted, json_option, quiet_option, recursive_option, table


def _side_spec(ctx, param, value: str) -> str:
    """A malformed REPLICA@OFFSET is a usage error (exit 2), as a malformed --to is elsewhere;
    a side that does not exist is left to open_sides (exit 3)."""
    from ..diff import parse_spec
    from ..errors import InvalidInput

    try:
        parse_spec(value)
    except InvalidInput as exc:
        raise click.BadParameter(exc.one_line()) from None
    except Exception:  # anything else is reported when the side is opened
        pass
    return value


@click.command("diff")
@click.pass_context
@click.argument("a", metavar="A", callback=_side_spec)
@click.argument("b", metavar="B", callback=_side_spec)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, metavar="K",
              help="List the K rows with the largest change per tensor.")
@click.option("--tensor", "tensors", multiple=True, metavar="NAME",
              help="Compare only this tensor (repeatable).")
@click.option("--force", is_flag=True,
              help="Compare different models anyway: the tensors both hold alike, listing the rest.")
@recursive_option
@json_option
@quiet_option
def command(ctx, a, b, top, tensors, force, recursive, as_json, quiet):
    """Show what changed from A to B: rows, buckets, and the size of the change.

    A and B are replica directories, REPLICA@OFFSET (the replica as it was
    at a retained offset), or checkpoints (.npz, .safetensors, a directory
    of .npy files). Exits 0 when they are identical, 1 when they differ.
    """
    from ..diff import diff, open_sides

    out = Output(as_json, quiet)
    with open_sides((a, b), recursive) as (side_a, side_b), out.progress("diff") as update:
        result = diff(side_a, side_b, top=top, tensors=tensors or None, force=force, progress=update)
    out.result(result.to_json(), lambda c: _render(c, result, only=bool(tensors)))
    if not result.identical:
        ctx.exit(1)


command.quick_exit = True  # no cyclic GC, no teardown at exit (cli.quick_exit)


def _side(side: dict) -> str:
    from rich.markup import escape

    where = "checkpoint" if side["offset"] is None else f"offset {side['offset']}"
    return f"[bold]{escape(side['spec'])}[/bold] ({where})"


def _how(result) -> str:
    if result.method == "log" and result.a["path"] == result.b["path"]:
        return "by the log"
    if result.method == "log":
        return f"by the logs since offset {result.anchor}, where both held the same model"
    if result.method == "values" and result.a["kind"] == result.b["kind"] == "replica" \
            and result.a["model_id"] == result.b["model_id"]:
        return "by value: no offset where both are known to have held the same model"
    return f"by {result.method}"


def _share(part: int, whole: int) -> str:
    """A fraction as a percentage with two significant digits (never a rounded-away 0% or 100%)."""
    if not whole:
        return "-"
    pct = 100.0 * part / whole
    if 0 < pct < 0.01:
        return "<0.01%"
    if 99.99 < pct < 100:
        return ">99.99%"
    return f"{pct:.2g}%" if pct < 10 else f"{pct:.0f}%"


def _num(x) -> str:
    return "nan/inf" if x is None else f"{x:.4g}"


def _render(c, result, only: bool = False) -> None:
    from rich.markup import escape

    if result.identical:
        how = f" (state digest {result.a['state_digest']} on both)" if result.method == "digest" else ""
        what = ""
        if only:  # --tensor: the rest was not looked at
            names = [t.name for t in result.tensors]
            what = f" in {'tensor' if len(names) == 1 else 'tensors'} {escape(', '.join(names))} (the others not compared)"
        c.print(f"[green]identical[/green]{what}: {_side(result.a)} and {_side(result.b)}{how}")
        return
    changed = [t for t in result.tensors if t.changed_rows]
    c.print(f"A  {_side(result.a)}")
    c.print(f"B  {_side(result.b)}")
    c.print(f"[yellow]{counted(result.changed_rows, 'row')} changed[/yellow] in "
            f"{counted(result.changed_buckets, 'bucket')} of {len(changed)} of {counted(len(result.tensors), 'tensor')} "
            f"({counted(result.rows_compared, 'row')} compared, {_how(result)})")
    if changed:
        t = table("tensor", "dtype", "shape", "rows", "of all", "buckets", "l2", "max |Δ|", "significance")
        t.columns[0].no_wrap, t.columns[0].overflow = False, "fold"  # a long name wraps, never becomes "…"
        for col in t.columns[3:]:
            col.justify = "right"
        for d in changed:
            data = d.to_json()
            rows = f"{d.changed_rows:,}" + (f" ({d.nonfinite_rows:,} nan/inf)" if d.nonfinite_rows else "")
            total = d.shape[0] if d.shape else 1
            t.add_row(escape(d.name), d.dtype, "x".join(map(str, d.shape)) or "scalar", rows,
                      _share(d.changed_rows, total), f"{d.changed_buckets:,}", _num(data["l2"]),
                      _num(data["max_abs"]), _num(data["significance"]))
        c.print()
        c.print(t)
    for d in changed:
        data = d.to_json()
        if data["top"]:
            c.print()
            top = table("row", "l2 of Δ", title=f"{escape(d.name)}: largest changes")
            for col in top.columns:
                col.justify = "right"
            for entry in data["top"]:
                top.add_row(f"{entry['row']:,}", _num(entry["l2"]))
            c.print(top)
        bins = [(f"[1e{h['log10']:+03d}, 1e{h['log10'] + 1:+03d})", h["count"]) for h in data["histogram"]]
        if d.zero_rows:
            bins.insert(0, ("0 (bits only)", d.zero_rows))
        if d.nonfinite_rows:
            bins.append(("nan/inf", d.nonfinite_rows))
        if bins:
            widest = max(n for _label, n in bins)
            hist = table("l2 of Δ per row", "rows", "", title=f"{escape(d.name)}: size of the changes")
            for label, n in bins:
                hist.add_row(label, f"{n:,}", "[cyan]" + "█" * max(1, round(24 * n / widest)) + "[/cyan]")
            c.print()
            c.print(hist)
    if result.incomparable:
        c.print()
        c.print(f"[red]{len(result.incomparable)} tensors not comparable[/red]:")
        for entry in result.incomparable:
            c.print(f"  {escape(entry['name'])}: {escape(entry['reason'])}")
