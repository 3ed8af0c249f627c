"""``imid-rems sandbox ...``: the sandbox EHR's commands (a development tool).

- ``imid-rems sandbox run``: the whole local stack `make run` starts (FHIR engine, seeded patients and the
  scenario corpus, the sandbox EHR with its SMART authorization server, the imid-rems service).
- ``imid-rems sandbox seed``: write or load the synthetic IMiD population.
"""

from __future__ import annotations

import sys

USAGE = """usage: imid-rems sandbox {run,seed} [options]

  run     start the local stack: FHIR engine + seeded patients + scenario corpus, the sandbox EHR
          (SMART authorization server, launcher, CDS hooks page) and the imid-rems service;
          prints the one URL to open; Ctrl-C stops everything  ('imid-rems sandbox run --help')
  seed    generate the synthetic IMiD population as FHIR transaction Bundles, into a directory or
          onto a FHIR server  ('imid-rems sandbox seed --help')
"""


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "run":
        from sandbox.run import main as run_main

        return run_main(rest)
    if command == "seed":
        from sandbox.seed import main as seed_main

        return seed_main(rest)
    out = sys.stdout if command in ("-h", "--help") else sys.stderr
    out.write(USAGE)
    return 0 if command in ("-h", "--help") else 2
