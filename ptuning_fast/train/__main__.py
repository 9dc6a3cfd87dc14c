"""``python -m ptuning_fast.train`` and ``torchrun -m ptuning_fast.train``: the training job."""
import sys

from .launch import main

if __name__ == "__main__":
    main(sys.argv[1:])
