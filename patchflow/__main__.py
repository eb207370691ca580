import sys

from patchflow.cli import main

sys.exit(main())
