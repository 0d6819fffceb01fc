import sys

from evoformer.cli import main

sys.exit(main())
