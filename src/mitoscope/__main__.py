"""``python -m mitoscope``: the same command line as the ``mitoscope`` script."""

from .cli import main

if __name__ == "__main__":
    main()
