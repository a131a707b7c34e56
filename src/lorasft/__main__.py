import sys

from lorasft.cli import main

sys.exit(main())
