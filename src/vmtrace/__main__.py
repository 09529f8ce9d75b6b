import sys

from vmtrace.cli import main

sys.exit(main())
