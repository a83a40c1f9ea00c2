import sys

from agent.cli.entry import main

sys.exit(main())
