"""Write the embedded sentiment dataset to OUT_DIR/train.jsonl and OUT_DIR/test.jsonl."""
import argparse
from pathlib import Path

from . import sentiment_examples, write_examples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ptuning_fast.data", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write train.jsonl and test.jsonl into")
    args = parser.parse_args(argv)
    for split in ("train", "test"):
        path = write_examples(sentiment_examples(split), args.out_dir / f"{split}.jsonl")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
