#!/usr/bin/env python
"""Train a segmentation network with cSE / sSE / scSE recalibration. See --help."""
import sys

from scse_seg.cli import main

if __name__ == "__main__":
    sys.exit(main())
