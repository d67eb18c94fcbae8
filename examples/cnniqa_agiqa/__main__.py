"""Entry point: `python -m examples.cnniqa_agiqa`."""

from examples.cnniqa_agiqa.cli import main

raise SystemExit(main())
