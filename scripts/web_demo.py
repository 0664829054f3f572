"""Web demo (Gradio, the `[demo]` extra): see tinygpt_v/inference/web_demo.py or --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygpt_v.cli.web_demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
