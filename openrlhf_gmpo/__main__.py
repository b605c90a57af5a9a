import sys

from openrlhf_gmpo.cli import main

sys.exit(main())
