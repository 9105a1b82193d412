import sys

from ivonserve.cli import main

sys.exit(main())
