"""`tinygpt-v-web-demo` / scripts/web_demo.py: quiet the harmless import-time notices first (the
web demo's module imports the models at the top), then start tinygpt_v.inference.web_demo."""
from __future__ import annotations

import sys

from .errors import quiet_harmless_warnings


def main(argv=None) -> int:
    quiet_harmless_warnings()
    from ..inference.web_demo import main as web_demo_main
    return web_demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
