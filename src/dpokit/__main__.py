"""`python -m dpokit` and `torchrun -m dpokit` run the `dpo` command."""

from dpokit.cli import main

if __name__ == "__main__":
    main()
