"""`python -m llmquant`."""

import sys

from llmquant.cli import main

sys.exit(main())
