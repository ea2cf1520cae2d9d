"""chkpnt, restore and dumpinfo: vzctl's checkpoint/restore, full and staged."""

from __future__ import annotations

from pathlib import Path

import click

from vzpy.cli import display
from vzpy.cli.app import App
from vzpy.container import Container
from vzpy.stage import Action

DUMPFILE = click.option("--dumpfile", type=click.Path(path_type=Path), help="Dump file (default: DUMPDIR/Dump.CTID).")

CHKPNT_EPILOG = """\b
Stages (each may be its own invocation; several flags run in this order):
  --suspend   freeze the CT and lock its network (peers see a pause)
  --dump      write the suspended CT's state to the dump file; it stays suspended
  --kill      stop the dumped CT (the dump file stays)    | or
  --resume    let the suspended or dumped CT run on
Without a stage flag: --suspend --dump --kill (vzctl chkpnt).
A live snapshot for cron: --snapshot (= --suspend --dump --resume; also --leave-running).
"""
RESTORE_EPILOG = """\b
Stages (each may be its own invocation):
  --undump    recreate the processes from the dump file, frozen, network locked
  --resume    wake them                                   | or
  --kill      kill them; the CT is stopped, the dump file kept
Without a stage flag: --undump --resume (vzctl restore).
The CT's files must equal those at checkpoint (checked; --skip-fs-check to override),
unless the dump was made with --with-fs, whose files are put back first.
"""


@click.command(epilog=CHKPNT_EPILOG)
@click.argument("ctid")
@DUMPFILE
@click.option("--suspend", "do_suspend", is_flag=True, help="Freeze the CT and lock its network.")
@click.option("--dump", "do_dump", is_flag=True, help="Write the suspended CT's state to the dump file.")
@click.option("--kill", "do_kill", is_flag=True, help="Stop the dumped CT.")
@click.option("--resume", "do_resume", is_flag=True, help="Let the suspended/dumped CT run on.")
@click.option("--snapshot", "--leave-running", "snapshot", is_flag=True, help="--suspend --dump --resume.")
@click.option("--compress", is_flag=True, help="zstd-compress the dump file.")
@click.option("--with-fs", is_flag=True, help="Also store the CT's files: the dump stays restorable after they change.")
@click.pass_obj
def chkpnt(
    app: App,
    ctid: str,
    dumpfile: Path | None,
    do_suspend: bool,
    do_dump: bool,
    do_kill: bool,
    do_resume: bool,
    snapshot: bool,
    compress: bool,
    with_fs: bool,
) -> None:
    """Checkpoint running CT CTID to a dump file and stop it (or one stage of that)."""
    from vzpy import checkpoint

    actions = checkpoint.chkpnt_actions(do_suspend, do_dump, do_kill, do_resume, snapshot)
    ct = app.existing(ctid)
    with app.locked(ct, "chkpnt"):
        target = checkpoint.DumpTarget(checkpoint.dumpfile_for(ct, dumpfile), compress=compress, with_fs=with_fs)
        checkpoint.run_chkpnt(ct, actions, target, app.progress)


@click.command(epilog=RESTORE_EPILOG)
@click.argument("ctid")
@DUMPFILE
@click.option("--undump", "do_undump", is_flag=True, help="Recreate the processes, frozen.")
@click.option("--resume", "do_resume", is_flag=True, help="Wake the undumped processes.")
@click.option("--kill", "do_kill", is_flag=True, help="Kill the undumped processes.")
@click.option("--skip-fs-check", is_flag=True, help="Restore even if the CT's files differ from the checkpoint's.")
@click.pass_obj
def restore(
    app: App, ctid: str, dumpfile: Path | None, do_undump: bool, do_resume: bool, do_kill: bool, skip_fs_check: bool
) -> None:
    """Restore CT CTID from a dump file, here or on another host with the same files."""
    from vzpy import checkpoint

    actions = checkpoint.restore_actions(do_undump, do_resume, do_kill)
    ct = app.container(ctid)
    with app.locked(ct, "restore"):
        path = checkpoint.dumpfile_for(ct, dumpfile) if Action.UNDUMP in actions else None
        imported = path is not None and not ct.exists() and _import_config(ct, path)
        try:
            checkpoint.run_restore(
                app.existing(ctid), actions, path, skip_fs_check=skip_fs_check, progress=app.progress
            )
        except BaseException:
            if imported:
                ct.conf_path.unlink(missing_ok=True)
            raise


def _import_config(ct: Container, path: Path) -> bool:
    """A CT unknown here (restore on another host): take its CTID.conf from the dump file."""
    from vzpy import checkpoint, dumpfile

    checkpoint.check_dump_source(path)
    manifest = dumpfile.read_manifest(path)
    checkpoint.import_config(ct, manifest)
    return True


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--verify", is_flag=True, help="Also check every member's size and digest (reads the whole file).")
@click.pass_obj
def dumpinfo(app: App, path: Path, as_json: bool, verify: bool) -> None:
    """Show what a dump file holds (CT, time, processes, memory) without restoring it."""
    from vzpy import checkpoint, dumpfile

    checkpoint.check_dump_source(path)
    manifest = dumpfile.verify(path) if verify else dumpfile.read_manifest(path)
    if as_json:
        display.out(manifest.to_json())
        return
    for line in dumpfile.describe(manifest):
        display.out(line)
    if verify:
        display.out(f"verified: every member's size and {manifest.digest} digest match")
