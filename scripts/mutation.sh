#!/usr/bin/env bash
# Mutation testing of one module with mutmut, against only the unit tests that exercise it.
#
#   scripts/mutation.sh MODULE [TEST_FILE...]      e.g. scripts/mutation.sh criu/options.py
#   make mutation MODULE=criu/options.py
#
# MODULE is a path under src/vzpy/. Without TEST_FILEs, the tests are every tests/unit/test_*.py that imports
# the module or, for a module inside a subpackage, that subpackage (`from vzpy.dumpfile import ...`); mutmut
# then runs for each mutant only the tests that call the mutated function.
# The run works on a copy of the tree in a temporary directory: the checkout is never mutated, and edits made
# meanwhile do not disturb it. It prints each undetected mutant's diff, then the score: detected (a test
# failed, or the mutant made a test time out) / all mutants; "no tests" and "suspicious" count as undetected.
# Not part of `make test`: it takes minutes, mostly waiting out the mutants that make a loop endless.
# mutmut mutates the bodies of functions and methods only: module-level constants, and functions with a
# decorator other than @classmethod/@staticmethod (@contextmanager, @property), are not mutated.
# Env: VZPY_VENV (default /opt/vzpy/venv); MUTATION_JOBS (default 2) mutants at a time;
# MUTATION_KEEP=1 keeps the work directory (there, `mutmut show NAME` shows a mutant).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VZPY_VENV:-/opt/vzpy/venv}
if [ $# -lt 1 ]; then
  echo "usage: $0 MODULE [TEST_FILE...]   (MODULE is a path under src/vzpy/, e.g. criu/options.py)" >&2
  exit 2
fi
module=${1#src/vzpy/}
shift
source_file=src/vzpy/$module
if [ ! -f "$source_file" ]; then
  echo "no such module: $source_file (give a path under src/vzpy/, e.g. criu/options.py)" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/mutmut" ]; then
  echo "mutmut is not installed in $VENV: run \`make setup\` (it installs the dev extra)" >&2
  exit 2
fi

dotted=vzpy.$(echo "${module%.py}" | tr / .)
dotted=${dotted%.__init__}
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  parent=${dotted%.*}
  leaf=${dotted##*.}
  pattern="(from|import) ${dotted//./\\.}\b|from ${parent//./\\.} import .*\b${leaf}\b"
  if [ "$parent" != vzpy ]; then
    pattern="$pattern|(from|import) ${parent//./\\.}\b"
  fi
  mapfile -t tests < <(grep -lE "$pattern" tests/unit/test_*.py | sort)
fi
if [ ${#tests[@]} -eq 0 ]; then
  echo "no unit test imports $dotted: name the test files after the module" >&2
  exit 2
fi

work=$(mktemp -d /tmp/vzpy-mutation.XXXXXX)
if [ "${MUTATION_KEEP:-0}" = 1 ]; then
  echo "work directory (kept): $work"
else
  trap 'rm -rf "$work"' EXIT
fi
tar -cf - --exclude=__pycache__ --exclude='*.pyc' src tests pyproject.toml | tar -xf - -C "$work"
# mutmut reads [tool.mutmut] from pyproject.toml, else [mutmut] from setup.cfg: the copy gets the latter.
{
  echo "[mutmut]"
  echo "source_paths = src"
  echo "only_mutate = $source_file"
  echo "pytest_add_cli_args_test_selection ="
  printf '    %s\n' "${tests[@]}"
  echo "pytest_add_cli_args = -p no:cacheprovider -q"
} >"$work/setup.cfg"

echo "mutating $source_file against: ${tests[*]}"
cd "$work"
export PATH=$VENV/bin:$PATH
if ! mutmut run --max-children "${MUTATION_JOBS:-2}" >mutmut-run.log 2>&1; then
  tail -40 mutmut-run.log >&2
  echo "mutmut run failed (the end of its log is above)" >&2
  exit 1
fi
mutmut results --all true >results.txt
# Each undetected mutant with its diff: a test should kill it, or it is equivalent to the original.
{ grep -E ': (survived|no tests|suspicious)$' results.txt || true; } | while read -r line; do
  echo "== ${line}"
  mutmut show "${line%%:*}" | sed -n '/^@@/,$p'
done
python - results.txt "$source_file" <<'PY'
import sys
from collections import Counter

counts = Counter(line.rsplit(": ", 1)[1].strip() for line in open(sys.argv[1]) if ": " in line)
detected = sum(counts[status] for status in ("killed", "timeout", "segfault", "caught by type check"))
total = sum(n for status, n in counts.items() if status not in ("skipped", "not checked"))
summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
score = 100.0 * detected / total if total else 0.0
print(f"{sys.argv[2]}: mutation score {score:.1f}% ({detected}/{total} detected; {summary})")
PY
