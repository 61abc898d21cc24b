import sys

from pdcluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
