"""The environment of a child JAX process that a test starts on CPU.

The child keeps the parent's `XLA_FLAGS` (e.g. launch/test.sh's compile flags), so the parent and
the child compile alike, less any `--xla_force_host_platform_device_count`: `devices` sets that
count, or (None) the child chooses (`ALPHAFUSE_CPU_DEVICES`, or one device per core).
"""

import os


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if devices is not None:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
  env.pop('XLA_FLAGS', None)
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  return env
