#!/usr/bin/env bash
# dies_test.sh HOW SECONDS MPIRUN-COMMAND...: runs the command (a job in which one process
# fails, HOW = error, or is killed, HOW = signal, while the others wait for it) and passes
# if the job ends with a non-zero status within SECONDS, and, for an error, the failing
# process's message reached stderr.
set -uo pipefail
how="$1"
seconds="$2"
shift 2
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
start=$SECONDS
timeout --kill-after=5 "$seconds" "$@" >/dev/null 2>"$err"
rc=$?
elapsed=$((SECONDS - start))
if ((rc == 0)); then
    echo "dies_test: the job exited with 0; expected an error" >&2
    exit 1
fi
if ((rc == 124 || elapsed >= seconds)); then
    echo "dies_test: the job still ran after ${seconds} s (it hung waiting for the dead process)" >&2
    sed 's/^/    /' "$err" >&2
    exit 1
fi
if [[ "$how" == error ]] && ! grep -q "the test's failure at step 2" "$err"; then
    echo "dies_test: the failing process's message is not in stderr:" >&2
    sed 's/^/    /' "$err" >&2
    exit 1
fi
echo "dies_test: the job ended with status $rc after ${elapsed} s, as expected"
