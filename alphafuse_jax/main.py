"""Entry point: `python -m alphafuse_jax.main --config=configs/default.py --workdir=DIR`.

Flags only; the work is `train.train_and_evaluate`. Override any config field with
`--config.train.learning_rate=3e-4`. A run restarted on the same workdir resumes.

The project's own errors (`errors.AlphafuseError`: a bad config, input file, workdir or
checkpoint) print as one line on stderr, naming the problem and the fix, and exit with code 2;
`--debug` (or ALPHAFUSE_DEBUG=1) shows their traceback. Any other exception is a bug and keeps
its traceback.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from alphafuse_jax import errors
from alphafuse_jax import parallel

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.',
                               required=True)
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of configuration and input errors.')
EXIT_INPUT_ERROR = 2


def run(config, workdir: str, debug: bool = False) -> int:
  """`train_and_evaluate` with the project's errors as one stderr line; returns the exit code."""
  from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
  try:
    results = train.train_and_evaluate(config, workdir)
  except errors.AlphafuseError as e:
    if debug or os.environ.get('ALPHAFUSE_DEBUG'):
      raise
    print(f'error: {errors.one_line(e)}', file=sys.stderr, flush=True)
    return EXIT_INPUT_ERROR
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and results is not None:  # None: stop_after_steps stopped it.
    print(format_results(results))
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  # Orbax logs every save at INFO; keep the console for our progress unless asked (--verbosity=0).
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  dist = config.distributed
  import jax  # After flags: XLA_FLAGS must be set before JAX starts its backends.
  if dist.enabled:
    # Multi-host: coordinator/process ids from the config, or auto-detected on TPU/SLURM.
    kwargs = {k: v for k, v in (('coordinator_address', dist.coordinator_address),
                                ('num_processes', dist.num_processes),
                                ('process_id', dist.process_id)) if v not in (None, '', -1)}
    jax.distributed.initialize(**kwargs)
  logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(),
               jax.process_count())
  return run(config, _WORKDIR.value, debug=_DEBUG.value)


def format_results(results) -> str:
  """A Markdown table of the headline metrics (val at the best epoch, test, test groups)."""
  cols = ['HR@10', 'HR@20', 'NDCG@10', 'NDCG@20', 'MRR@20']
  rows = [('val', results['val']), ('test', results['test'])]
  rows += [(f'test {name}', m) for name, m in results.get('test_groups', {}).items()]
  lines = ['| split | ' + ' | '.join(cols) + ' | examples |', '|---' * (len(cols) + 2) + '|']
  for name, m in rows:
    lines.append(f'| {name} | ' + ' | '.join(f'{m[c]:.4f}' for c in cols) +
                 f' | {m.get("count", "")} |')
  eval_rate = results['eval_examples_per_second']  # None: no steady-state pass was timed.
  lines.append(f'\nbest epoch {results["best_epoch"]}; train {results["train_sequences_per_second"]:.0f}'
               f' sequences/s; eval {"n/a" if eval_rate is None else f"{eval_rate:.0f}"} '
               'examples/s; wall '
               f'{results["wall_seconds"]:.0f} s on {results["devices"]} device(s)')
  run = results.get('run_seconds')  # Every process of a resumed run (None: not counted).
  if run is not None and run > results['wall_seconds'] + 1:
    lines[-1] += f' ({run:.0f} s over every process of this resumed run)'
  return '\n'.join(lines)


if __name__ == '__main__':
  # CPU: one host device per core (XLA uses several cores poorly inside one CPU device);
  # ALPHAFUSE_CPU_DEVICES=N overrides the count.
  parallel.force_host_devices(int(os.environ.get('ALPHAFUSE_CPU_DEVICES', '0')) or None)
  app.run(main)
