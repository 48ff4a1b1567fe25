"""Top layer: `python -m neardup` runs the command line, as the `neardup` script does."""
from neardup.cli import main

main()
