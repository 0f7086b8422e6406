"""`python -m flannel_repro ...` is the `flannel-repro` command."""

from flannel_repro.cli import main

raise SystemExit(main())
