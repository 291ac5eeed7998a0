"""`python -m maskedlm ...` (and `torchrun -m maskedlm ...`) runs the command line."""

from maskedlm.cli import main

if __name__ == "__main__":
    main()
