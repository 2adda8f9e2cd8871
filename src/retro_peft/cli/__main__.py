import sys

from retro_peft.cli import main

sys.exit(main())
