#!/usr/bin/env python3
"""Writes the README's sample output of `bash scripts/run-mlp.sh` (its mlp-output block):
runs it with the default settings (or the arguments given, which go to lowrank-mlp),
takes the epoch lines it prints on stderr and the JSON line it ends stdout with, and puts
them between the README's markers with the date, the machine and the command.

    python3 scripts/readme_mlp.py
"""

import datetime
import subprocess
import sys

from results_common import ROOT, machine_line, replace_block

BEGIN, END = "<!-- mlp-output:begin -->", "<!-- mlp-output:end -->"


def main():
    cmd = ["bash", str(ROOT / "scripts" / "run-mlp.sh"), *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"readme_mlp: run-mlp.sh failed with exit code {proc.returncode}")
    # stderr is not a terminal here: no progress bar, only lowrank-mlp's own lines (the
    # build's output goes to stdout before the JSON line, which is the last).
    lines = [l for l in proc.stderr.splitlines() if l.startswith(("lowrank-mlp:", "epoch "))]
    result = proc.stdout.strip().splitlines()[-1]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    body = [BEGIN, "```text", *lines, result, "```", "",
            f"Written by `python3 scripts/readme_mlp.py` (which runs `bash scripts/run-mlp.sh"
            f"{''.join(' ' + a for a in sys.argv[1:])}`) on {now[:10]}, {machine_line()}.", END]
    replace_block(ROOT / "README.md", BEGIN, END, "\n".join(body))


if __name__ == "__main__":
    main()
