import sys

from distrib.commands.cli import main

sys.exit(main())
