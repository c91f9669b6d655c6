"""`python -m savepoint`: the same command line as the `savepoint` entry point."""

from savepoint.cli import main

if __name__ == "__main__":
    main()
