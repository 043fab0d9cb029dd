"""python -m nanofast.compare: the same as nanofast-compare."""
import sys

from nanofast.compare.cli import main

sys.exit(main())
