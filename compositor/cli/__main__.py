"""`python -m compositor.cli`: the `directflip` command without its installed script."""

import sys

from compositor.cli import main

sys.exit(main())
