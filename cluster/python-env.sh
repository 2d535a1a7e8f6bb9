# Sourced by the cluster scripts: pick the Python environment to run Ray from, with no PATH assumption.
#   PYTHON   the interpreter (default: the first of the repository's .venv/bin/python and python3 on PATH
#            that can import everything in $NEEDS, i.e. the environment the project is installed in)
# Sets PYTHON and RAY (the `ray` CLI installed next to that interpreter) and puts that environment's bin
# directory first on PATH, so processes started from here (Ray nodes, and the `python -m jobs...` entry
# points of jobs submitted to them) run in it too.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NEEDS=${NEEDS:-ray}
if [ -z "${PYTHON:-}" ]; then
  for candidate in "$_repo/.venv/bin/python" "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c "import $NEEDS" 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ] || ! "$PYTHON" -c "import $NEEDS" 2>/dev/null; then
  echo "error: no Python that can import $NEEDS (tried \$PYTHON, $_repo/.venv/bin/python, python3);" \
    "install the project (make install PYTHON=...) and pass PYTHON=/path/to/that/python" >&2
  exit 2
fi
_bin=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')
RAY="$_bin/ray"
if [ ! -x "$RAY" ]; then
  echo "error: $PYTHON has no ray CLI next to it ($RAY); reinstall ray[default] into that environment" >&2
  exit 2
fi
export PATH="$_bin:$PATH"
