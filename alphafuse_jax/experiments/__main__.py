r"""The experiment suite: every pipeline x seed in one command, then tables and plots.

  python -m alphafuse_jax.experiments --suite=ml1m_sasrec [--seeds=22,23,24] \
      [--pipelines=alphafuse,id] [--report_only] [--publish_dir=docs/experiments]

Each cell (one variant, one seed) trains in its own subprocess of `alphafuse_jax.main` with the
workdir `<results_dir>/<suite>/runs/<cell>` and its log beside it as `<cell>.log`. A cell whose
`results.json` exists is skipped, an interrupted one resumes (main auto-resumes from its workdir),
a failed one is reported with its log and the suite goes on, exiting nonzero at the end.

Finished cells are also recorded, metrics only, in the committed archive `docs/runs/<suite>/`
(`archive.py`; --archive_dir): an archived cell is not rerun, and the report reads it when its
workdir is gone, so a suite of hour-long cells can be finished over several machines or sessions.

The report (`<results_dir>/<suite>/README.md`, `summary.json` and PNG plots) gives mean +- sample
std (ddof=1) over seeds of HR@10/20 and NDCG@10/20, overall and for tail/head target items and
short/long users, computed from each cell's `test_ranks.npz` with `evaluation.group_masks` at
the suite config's thresholds (or --short_history/--head_fraction); a paired comparison of every
variant against the suite's baseline calls a difference a tie when it is smaller than the
seeds' spread.
"""

import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from alphafuse_jax.experiments import archive
from alphafuse_jax.experiments import report
from alphafuse_jax.experiments import runner
from alphafuse_jax.experiments import suites
from alphafuse_jax.experiments.suites import REPO_ROOT

# The suite names, as in 'ml1m_sasrec, null_dim_sweep or smoke'.
_SUITE_NAMES = ', '.join(list(suites.SUITES)[:-1]) + f' or {list(suites.SUITES)[-1]}'
flags.DEFINE_string('suite', None, f'{_SUITE_NAMES}.', required=True)
flags.DEFINE_list('seeds', None, 'Seeds (default: the suite\'s).')
flags.DEFINE_list('pipelines', None, 'Rows to run (default: all of the suite\'s); with '
                  '--report_only, the rows to report.')
flags.DEFINE_bool('report_only', False, 'Only (re)write the report from existing runs.')
flags.DEFINE_bool('status', False, 'Only list each cell\'s state (finished, archived, running, '
                  'interrupted at epoch E, not started); nothing is run or written.')
flags.DEFINE_string('results_dir', 'results', 'Root of results/<suite>/.')
flags.DEFINE_string('publish_dir', '', 'Also copy README.md and the PNGs here.')
flags.DEFINE_integer('short_history', None,
                     'Short users: fewer than this many items before the target (default: the '
                     "suite config's config.eval.short_history).")
flags.DEFINE_float('head_fraction', None,
                   'Head items: this fraction of the most interacted in train (default: the '
                   "suite config's config.eval.head_fraction).")
flags.DEFINE_bool('spectrum', True, 'Draw the language-embedding spectrum plot.')
flags.DEFINE_string('archive_dir', str(REPO_ROOT / archive.DEFAULT_DIR),
                    'The committed archive of finished cells (metrics only; see archive.py): '
                    'archived cells are not rerun and report without their workdir, and every '
                    "finished cell is recorded there. '' turns it off.")


def main(argv: Sequence[str]) -> int:
  """Runs the suite's unfinished cells (unless --report_only), then writes the report.

  Returns 1 when a cell failed or was busy in another process, else 0.
  """
  if len(argv) > 1:
    raise suites.SuiteError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:  # Keep the console for progress lines, as main.py does.
    logging.set_verbosity(logging.WARNING)
  suite = suites.make_suite(f.suite, seeds=[int(s) for s in f.seeds] if f.seeds else None,
                            variants=f.pipelines or None, results_dir=f.results_dir)
  # The command as typed, recorded in the README.
  command = 'python -m alphafuse_jax.experiments ' + ' '.join(a for a in sys.argv[1:])
  if f.status:
    runner.print_status(suite, f.results_dir, f.archive_dir or None)
    return 0
  failed = 0
  if not f.report_only:
    outcomes = runner.run_suite(suite, f.results_dir, archive_dir=f.archive_dir or None)
    failed = sum(o.status != 'done' and o.status != 'skipped' for o in outcomes)
    for o in outcomes:
      if o.status in ('failed', 'busy'):
        print(f'  {o.cell.name} {o.status}: {o.detail}', file=sys.stderr)
  # The report covers whatever has finished, also after failures; after a run of some cells,
  # every row and seed of the suite (--report_only reports the rows and seeds asked for).
  if not f.report_only:
    suite = suites.whole_suite(suite, f.results_dir)
  summary = report.report_from_config(suite, f.results_dir, short_history=f.short_history,
                                      head_fraction=f.head_fraction, with_spectrum=f.spectrum,
                                      command=command.strip(),
                                      archive_dir=f.archive_dir or None)
  out_dir = pathlib.Path(f.results_dir) / suite.name
  print(f'report: {out_dir / "README.md"} ({len(summary["not_finished"])} cells not finished)')
  if f.publish_dir:
    copied = report.publish(suite, f.results_dir, f.publish_dir)
    print(f'published {len(copied)} files to {f.publish_dir}')
  return 1 if failed else 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
