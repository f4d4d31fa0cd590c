r"""Check a training workdir's checkpoints before a long restart: `cvvae-checkpoint verify WORKDIR`.

(or `python -m cvvae_jax.train.verify verify WORKDIR`). Lists every step folder under `WORKDIR/checkpoints` (local or
`gs://`) with its status, size and whether it restores:

    step        status                                                       size  restores
    2           ok (47 files, crc32c)                                      11.2 MB  yes
    4           corrupt: state/ocdbt.process_0/d/86ba...: 1000 bytes, ...  14.9 MB  no
    6.corrupt   moved aside (not a step)                                   14.1 MB  -

Statuses: `ok` (every file matches its recorded checksum), `corrupt: FILE: why`, `unverified` (no checksums.json:
saved before checksums existed, or --no-checksums), `uncommitted` (an incomplete write, never restored), `moved aside`.
"restores" reads the whole state to host memory (numpy), as a resume would read it. Exit status 0 when the newest
committed step is intact and restores, 1 otherwise (the restart would fall back, or find nothing), 2 on a usage error.
"""
from __future__ import annotations

import sys
import time
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from cvvae_jax import cli, paths
from cvvae_jax.train import integrity
from cvvae_jax.weights.workdir import COMMIT_FILE, STATE, CheckpointReader, is_workdir


def restores(reader: CheckpointReader, step: int) -> None:
  """Reads the whole `state` of `step` to host numpy arrays (raises what Orbax or TensorStore raise)."""
  tree = reader.state_metadata(step)
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  reader.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args)}))


def check_workdir(workdir: str, *, checksums: bool = True, restore: bool = True) -> list[dict]:
  """One row per folder under `workdir/checkpoints`, oldest step first: {"name", "step", "status", "ok", "size",
  "restores" (True/False/None: not tried), "error", "seconds"}."""
  if not is_workdir(workdir):
    raise FileNotFoundError(f"expected a training workdir with checkpoints/, got {workdir}")
  rows = []
  with CheckpointReader(workdir) as reader:
    folders = sorted((p for p in reader.directory.iterdir() if p.is_dir()),
                     key=lambda p: (int(p.name.split(".")[0]) if p.name.split(".")[0].isdigit() else -1, p.name))
    for folder in folders:
      t0, name = time.time(), folder.name
      row = {"name": name, "step": int(name) if name.isdigit() else None, "ok": False, "restores": None,
             "error": "", "size": integrity.step_size(folder)}
      if integrity.is_moved_aside(name):
        row["status"] = "moved aside (not a step)"
      elif not name.isdigit():
        row["status"] = "not a step (an incomplete write)" if ".orbax-checkpoint-tmp" in name else "not a step"
      elif not (folder / COMMIT_FILE).exists():
        row["status"] = f"uncommitted (no {COMMIT_FILE}: an incomplete write, never restored)"
      else:
        try:
          record = integrity.verify_step(folder) if checksums else None
          row["status"] = (f"ok ({len(record['files'])} files, {integrity.ALGORITHM})" if record is not None else
                           f"unverified (no {integrity.CHECKSUMS_FILE})" if checksums else "not checked")
          row["ok"] = True
        except integrity.CheckpointIntegrityError as e:
          row["status"] = f"corrupt: {e.file}: {e.reason}"
        if restore:
          try:
            restores(reader, int(name))
            row["restores"] = True
          except Exception as e:  # pylint: disable=broad-except  # any read error is the answer
            row["restores"], row["error"] = False, integrity.first_line(e, 200)
      row["seconds"] = time.time() - t0
      rows.append(row)
  return rows


def _size(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_rows(rows: Sequence[dict]) -> str:
  lines = [f"{'step':<12}{'status':<64}{'size':>10}  restores"]
  for r in rows:
    status = r["status"] if len(r["status"]) <= 62 else r["status"][:59] + "..."
    restored = {True: "yes", False: "no", None: "-"}[r["restores"]]
    lines.append(f"{r['name']:<12}{status:<64}{_size(r['size']):>10}  {restored}")
    if r["error"]:
      lines.append(f"{'':<12}  {r['error']}")
  return "\n".join(lines)


def latest_is_good(rows: Sequence[dict]) -> bool:
  """Whether the newest committed step is intact (or unverified) and restores (when tried)."""
  steps = [r for r in rows if r["step"] is not None and not r["status"].startswith("uncommitted")]
  return bool(steps) and steps[-1]["ok"] and steps[-1]["restores"] is not False


def main(argv: Sequence[str] | None = None) -> int:
  """The `cvvae-checkpoint` entry point."""
  p = cli.parser("cvvae-checkpoint", __doc__)
  sub = p.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="list every step with its status, size and whether it restores")
  v.add_argument("workdir", help="a training workdir (local or gs://)")
  v.add_argument("--no-checksums", dest="checksums", action="store_false", help="skip the checksum comparison")
  v.add_argument("--no-restore", dest="restore", action="store_false", help="skip the trial restore")
  args = p.parse_args(argv)
  cli.quiet_io_logs()

  def run() -> int:
    t0 = time.time()
    rows = check_workdir(args.workdir, checksums=args.checksums, restore=args.restore)
    print(format_rows(rows))
    good = [r["name"] for r in rows if r["step"] is not None and r["ok"] and r["restores"] is not False]
    total = sum(r["size"] for r in rows)
    print(f"{len(rows)} folders in {paths.normalize(args.workdir)}/checkpoints, {_size(total)}, checked in "
          f"{time.time() - t0:.1f} s; newest good step: {good[-1] if good else 'none'}")
    return 0 if latest_is_good(rows) else 1

  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
