"""``python -m benchmarks [--quick]``: run every benchmark and write benchmarks/results/."""

from .run import main

raise SystemExit(main())
