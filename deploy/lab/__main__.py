"""`python -m deploy.lab`: the local cluster's command line."""

import sys

from deploy.lab.cli import main

sys.exit(main())
