#!/usr/bin/env python3
"""ctest docs/generated_blocks: every generated block of the README and docs/ carries the
marker of the script that wrote it. A block is the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->`; it passes when the two markers pair up, exactly one file under scripts/
(or bench/) holds the marker `NAME:begin` (the script that writes it; for a family of blocks
NAME = FAMILY:KEY, such as one per machine, the text `FAMILY:{`), and the block names that
script's path, or the path of a script under scripts/ that runs it (its "Written by" line or
its command). A block typed by hand, or one whose script was renamed or no longer writes it,
fails, naming the page and the line.

    check_generated_blocks.py REPO_ROOT
"""

import re
import sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
writers = {}
for folder in ("scripts", "bench"):
    for f in sorted((root / folder).rglob("*")):
        if f.suffix in (".py", ".sh") and f.is_file():
            text = f.read_text(errors="replace")
            names = re.findall(r"<!-- ([a-z0-9_-]+):begin -->", text) + re.findall(r"([a-z0-9_-]+:)\{", text)
            for name in names:
                writers.setdefault(name, set()).add(f.relative_to(root).as_posix())
# The scripts that run each script (scripts/bench.sh runs scripts/bench_table.py).
runners = {}
for f in sorted((root / "scripts").glob("*")):
    if f.suffix in (".py", ".sh") and f.is_file():
        text = f.read_text(errors="replace")
        for script in {s for names in writers.values() for s in names}:
            if Path(script).name in text and f.relative_to(root).as_posix() != script:
                runners.setdefault(script, set()).add(f.relative_to(root).as_posix())

pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
errors, blocks = [], 0
for page in pages:
    text = page.read_text()
    rel = page.relative_to(root).as_posix()
    for m in re.finditer(r"<!-- ([a-z0-9_:-]+):begin -->", text):
        name, line = m.group(1), text.count("\n", 0, m.start()) + 1
        end = text.find(f"<!-- {name}:end -->", m.end())
        if end < 0:
            errors.append(f"{rel}:{line}: block '{name}' has no '<!-- {name}:end -->'")
            continue
        blocks += 1
        scripts = writers.get(name.split(":")[0] + ":" if ":" in name else name, set())
        if len(scripts) != 1:
            errors.append(f"{rel}:{line}: block '{name}': expected one script under scripts/ or bench/ that writes it "
                          f"(holds '<!-- {name}:begin -->'), found {sorted(scripts) or 'none'}")
            continue
        script = next(iter(scripts))
        named = [s for s in [script, *sorted(runners.get(script, ()))] if s in text[m.end():end]]
        if not named:
            errors.append(f"{rel}:{line}: block '{name}' names neither its script {script} nor one that runs it "
                          f"({', '.join(sorted(runners.get(script, ()))) or 'none'})")
for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"generated blocks: {blocks} in {len(pages)} pages, each naming the script that writes it")
