"""`python -m detr_fast ...` (also `torchrun -m detr_fast train ...`): see detr_fast.cli."""
from detr_fast.cli import main

raise SystemExit(main())
