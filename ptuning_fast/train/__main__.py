"""``python -m ptuning_fast.train`` and ``torchrun -m ptuning_fast.train``: the training job."""
import sys

from .launch import main

main(sys.argv[1:])
