"""``python -m stream.cli``: the ``streamrec`` command without the installed script."""

import sys

from stream.cli.main import main

sys.exit(main())
