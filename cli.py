"""Entry point: ``python cli.py COMMAND ...`` (the same as the ``fkd`` console script)."""

from fkd.cli import main

if __name__ == "__main__":
    main()
