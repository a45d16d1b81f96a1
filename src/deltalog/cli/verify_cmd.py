"""deltalog verify: every checksum, and the tensors against the log."""

from __future__ import annotations

import click

from .console import Output, counted, json_option, quiet_option, wait_option


@click.command("verify")
@click.pass_context
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@wait_option
@json_option
@quiet_option
def command(ctx, replica, wait, as_json, quiet):
    """Check REPLICA: record checksums, their order and state digests, snapshot
    checksums, the tensor files against the model rebuilt from snapshot + log
    and against the head's state digest, and the bucket index. Exits 5, names
    each problem, and says how to repair what is damaged (JSON: "damaged",
    "repair"): 'replay --in-place' for tensor files, 'compact --from-tensors'
    or 'sync HEALTHY --reseed' for the log or snapshots.
    """
    from ..errors import IntegrityError
    from ..replica import Replica
    from ..verify import verify

    out = Output(as_json, quiet)
    with Replica.open(replica) as r, out.progress("verifying") as update:
        report = verify(r, wait=wait, progress=update)
    data = report.to_json()

    out.result(data, lambda c: c.print(
        f"ok: {replica} at offset {report.head}: {counted(report.records, 'record')}, "
        f"{counted(report.snapshots, 'snapshot')}, {counted(report.tensors, 'tensor')} verified") if report.ok else None)
    if not report.ok:
        if not as_json:
            for problem in report.problems:
                click.echo(f"damaged: {problem}", err=True)
            click.echo(f"deltalog: error: {replica}: {counted(len(report.problems), 'problem')} found in the "
                       f"{', '.join(report.damaged)}; {report.repair}", err=True)
        ctx.exit(IntegrityError.exit_code)
