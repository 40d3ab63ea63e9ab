"""``python -m trainer`` (and ``accelerate launch -m trainer sft ...``)."""

from .cli import app

if __name__ == "__main__":
    app()
