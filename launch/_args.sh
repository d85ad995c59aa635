# Sourced by the launchers: split "$@" into CONFIG (--config=), WORKDIR (--workdir=) and EXTRA
# (everything else, e.g. --config.train.seed=3, passed on to Python unchanged).
# Usage: parse_run_args DEFAULT_WORKDIR "$@"
parse_run_args() {
  WORKDIR="$1"; shift
  CONFIG=configs/default.py
  EXTRA=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      --config=*) CONFIG="${arg#--config=}" ;;
      --workdir=*) WORKDIR="${arg#--workdir=}" ;;
      *) EXTRA+=("$arg") ;;
    esac
  done
}
