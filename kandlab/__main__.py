"""``python -m kandlab doctor`` — the same as the ``kandlab`` console script."""
from kandlab.cli import main

raise SystemExit(main())
