"""`python -m gateway.emulator --port 8080 --tls-port 8443`: serve the emulator until Ctrl-C."""

import sys

from gateway.emulator.server import main

sys.exit(main())
