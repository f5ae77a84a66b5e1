"""``python -m hgad`` (also what ``torchrun -m hgad`` runs)."""

from hgad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
