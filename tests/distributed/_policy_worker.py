"""Entry point of one rank of the policy parity checks: ``python _policy_worker.py <scenario> <out_dir>``.

Deliberately free of heavy top-level imports: checkpoint saving starts a spawn-context
``multiprocessing`` manager that re-imports this file as ``__mp_main__``; keeping it light makes
that start take well under a second instead of re-importing torch and Megatron-Core.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _policy_scenarios import main

    main(sys.argv[1:])
