"""``python -m medtl`` (also what ``torchrun -m medtl`` runs)."""

from medtl.cli import main

main()
