"""`python -m calmline` is the same as the `calmline` console script."""

from calmline.cli import main

raise SystemExit(main())
