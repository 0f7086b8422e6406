"""`python -m flannel_repro.cli ...` is the `flannel-repro` command, as `python -m flannel_repro` is."""

from flannel_repro.cli import main

raise SystemExit(main())
