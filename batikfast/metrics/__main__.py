import sys

from batikfast.metrics.compute import main

sys.exit(main())
