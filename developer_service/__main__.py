import sys

from developer_service.cli import main

sys.exit(main())
