"""`python -m model.demo`: train (or confirm) the demo checkpoint; see `model.demo.recipe`."""

from model.demo.recipe import main

raise SystemExit(main())
