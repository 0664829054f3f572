"""Terminal chat / batch prediction: the same as `python -m tinygpt_v.chat` (see its --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygpt_v.chat import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
