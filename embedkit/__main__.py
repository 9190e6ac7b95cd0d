"""`python -m embedkit` runs the CLI (this is also what `torchrun -m embedkit` uses)."""

from embedkit.cli import main

main()
