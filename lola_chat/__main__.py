import sys

from lola_chat.cli import main

sys.exit(main())
