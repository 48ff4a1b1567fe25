#!/usr/bin/env bash
# The whole test suite on a busy machine (issue 30 item 7): README.md's test command, run N times with busy
# processes beside it taking cores, each run's passes, failures (by name), wall time and load average in a
# table; --record appends the table to benchmarks/RESULTS.md. Tests must wait for the events they need, never
# count what happens in a time window: here they are given every chance to show it.
#
# The command is read from README.md (the code block after "The whole test suite:"), not restated here. Its
# `pip install` steps run once before the runs (not timed), or not at all with --skip-install (a machine where
# neardup is installed already, e.g. editable from another checkout: installing would re-point it).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benchmarks/busy_tests.sh [-n RUNS] [--busy N] [--record] [--note TEXT] [--skip-install] [-- PYTEST_ARGS...]

  -n, --runs RUNS   runs of the suite, one after another (default 3)
  --busy N          busy processes (`python3 -c 'while True: pass'`) beside each run (default 2)
  --record          append the table to benchmarks/RESULTS.md, in the section "Whole test suite beside busy
                    processes (busy_tests.sh)"
  --note TEXT       a line added under the table (e.g. what else loaded the machine)
  --skip-install    do not run the command's pip install steps
  -- ARGS           appended to the pytest command (e.g. one test file, for a smoke run)

Exit status 0 when every run passed, 1 when one failed. Run from anywhere; it works in the repository root.
EOF
}

RUNS=3
BUSY=2
RECORD=0
NOTE=""
INSTALL=1
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--runs) RUNS="$2"; shift 2 ;;
        --busy) BUSY="$2"; shift 2 ;;
        --record) RECORD=1; shift ;;
        --note) NOTE="$2"; shift 2 ;;
        --skip-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "busy_tests.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$RUNS$BUSY" in *[!0-9]*) echo "busy_tests.sh: -n and --busy take whole numbers" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# README.md's command: the first line of the fenced block that follows "The whole test suite:"
COMMAND="$(awk '/^The whole test suite:/ {found = 1; next}
                found && /^```/ {if (inside) exit; inside = 1; next}
                found && inside && NF {print; exit}' README.md)"
if [ -z "$COMMAND" ]; then
    echo "busy_tests.sh: no test command found in README.md after 'The whole test suite:'" >&2
    exit 2
fi
# its steps: `pip install` ones run once before the runs, the rest is the timed test command
INSTALLS=()
TEST=""
IFS=$'\n' read -r -d '' -a STEPS < <(printf '%s' "$COMMAND" | sed 's/ && /\n/g'; printf '\0') || true
for step in "${STEPS[@]}"; do
    if [[ "$step" == *" -m pip install "* || "$step" == "pip install "* ]]; then
        INSTALLS+=("$step")
    else
        TEST="${TEST:+$TEST && }$step"
    fi
done
if [ "${#EXTRA[@]}" -gt 0 ]; then
    TEST="$TEST $(printf '%q ' "${EXTRA[@]}")"
fi

LOGS="$(mktemp -d "${TMPDIR:-/tmp}/busy_tests.XXXXXX")"
PIDS=()
TESTPID=""
stop_busy() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_busy EXIT
trap '[ -z "$TESTPID" ] || kill "$TESTPID" 2>/dev/null; stop_busy; exit 130' INT TERM

if [ "$INSTALL" = 1 ]; then
    for step in "${INSTALLS[@]}"; do
        echo "busy_tests.sh: installing first (not timed): $step" >&2
        bash -c "$step"
    done
fi

load1() { cut -d' ' -f1 /proc/loadavg; }

echo "busy_tests.sh: $RUNS run(s) of: $TEST  (beside $BUSY busy processes; logs in $LOGS)" >&2
ROWS=()
ALL_PASSED=1
for run in $(seq 1 "$RUNS"); do
    for _ in $(seq 1 "$BUSY"); do
        python3 -c 'while True: pass' &
        PIDS+=("$!")
    done
    log="$LOGS/run$run.log"
    before="$(load1)"
    start="$(date +%s.%N)"
    status=0
    bash -c "$TEST" >"$log" 2>&1 &  # waited for in the background, so that a signal stops it at once
    TESTPID=$!
    wait "$TESTPID" || status=$?
    TESTPID=""
    end="$(date +%s.%N)"
    after="$(load1)"
    stop_busy
    # pytest's last summary line: "== 3 failed, 290 passed, 4 skipped in 612.34s (0:10:12) ==" (no "==" with -q)
    summary="$(grep -E '^(=+ )?[0-9a-z ,]*(passed|failed|errors?|skipped|no tests ran)[0-9a-z ,]* in [0-9.]+s' "$log" |
               tail -1 || true)"
    count() { printf '%s' "$summary" | grep -oE "[0-9]+ $1" | head -1 | cut -d' ' -f1 || true; }
    passed="$(count passed)"; failed="$(count failed)"; errors="$(count 'errors?')"; skipped="$(count skipped)"
    names="$(grep -E '^(FAILED|ERROR) ' "$log" | sed -E 's/^(FAILED|ERROR) ([^ ]+).*/\2/' | sort -u |
             paste -sd ' ' - || true)"
    wall="$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.0f", b - a}')"
    if [ "$status" != 0 ] || [ -z "$summary" ]; then
        ALL_PASSED=0
        [ -n "$names" ] || names="(exit $status; see $log)"
    fi
    ROWS+=("| $run | ${passed:-0} | ${failed:-0} | ${errors:-0} | ${skipped:-0} | $wall | $before / $after | ${names:-none} |")
    echo "busy_tests.sh: run $run: exit $status, $wall s: ${summary:-no pytest summary}" >&2
done

TABLE="$(printf '%s\n' "| run | passed | failed | errors | skipped | wall s | load (1 min) start / end | failures |" \
                       "|---|---|---|---|---|---|---|---|" "${ROWS[@]}")"
HELD="$(printf '%s\n' "${ROWS[@]}" | awk -F'|' '$4 + 0 == 0 && $5 + 0 == 0 && $9 ~ /none/' | wc -l)"
VERDICT="$HELD of $RUNS runs passed"
echo
echo "$TABLE"
echo
echo "$VERDICT"

if [ "$RECORD" = 1 ]; then
    {
        echo
        echo "## Whole test suite beside busy processes (busy_tests.sh)"
        echo
        echo "*Do the tests hold on a busy machine? README.md's test command, run $RUNS time(s), each beside $BUSY busy"
        echo "processes (\`python3 -c 'while True: pass'\`). Goal (issue 30 item 7): every run passes.*"
        echo
        echo "Command: \`benchmarks/busy_tests.sh -n $RUNS --busy $BUSY$([ "$INSTALL" = 1 ] || echo ' --skip-install')$([ "${#EXTRA[@]}" -gt 0 ] && printf ' -- %s' "${EXTRA[*]}")\`;"
        echo "each run: \`$TEST\`."
        echo "Machine: $(nproc) cores, $(python3 -c 'import platform; print(platform.platform())'); neardup @"
        echo "$(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(date -u +%Y-%m-%dT%H:%M:%SZ)."
        echo
        echo "$TABLE"
        echo
        echo "**$VERDICT.**"
        if [ -n "$NOTE" ]; then
            echo
            echo "- $NOTE"
        fi
    } >>benchmarks/RESULTS.md
    echo "busy_tests.sh: appended to benchmarks/RESULTS.md" >&2
fi

[ "$ALL_PASSED" = 1 ]
