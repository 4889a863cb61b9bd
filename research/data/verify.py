"""Find every unreadable image before a long run: `python -m research.data.verify --dataset=folder:PATH
[--split=train --split=test]` decodes each example of the splits once and lists the bad ones.

A corrupt or truncated file met during training stops the run with an error naming it (the last checkpoint stays
intact); this finds all of them in one pass instead. Exit status 0 when every example decodes, 1 when some do not
(one `bad: NAME: REASON` line each), 2 for a mistake in the arguments or the dataset.
"""

import sys

from research import UserError, cli, config as config_lib, data
from research.data import pipeline


def verify(dataset_flag, splits, data_dir=None, tfds_manual_dir=None):
    """{split: [(name, reason)]} of the examples of `splits` that cannot be read or decoded."""
    bad = {}
    for split in splits:
        if not split.strip():
            raise UserError("--split is empty: name a split (e.g. --split=train)")
        # Each split opened as an evaluation split; --image_size only decides resizing, which verifying skips.
        config = config_lib.make_config(model_dir="(unused)", train_steps=1, dataset=dataset_flag, train_split=None,
                                        eval_split=split, data_dir=data_dir, tfds_manual_dir=tfds_manual_dir,
                                        image_size=1)
        try:
            dataset = data.load(config)
        except UserError as e:  # It names the training flag that --split stands in for.
            raise UserError(str(e).replace(f"--eval_split={split}", f"--split={split}")) from None
        bad[split] = list(pipeline.unreadable(dataset.eval, dataset.preprocessing.channels, range(len(dataset.eval))))
        print(f"{split}: {len(dataset.eval)} examples, {len(bad[split])} unreadable", flush=True)
    return bad


def _main(argv):
    parser = cli.Parser(prog="python -m research.data.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="A TFDS name or folder:PATH, as research.train takes it.")
    parser.add_argument("--split", action="append", help="A split to check (repeatable; default: train and test).")
    parser.add_argument("--data_dir", help="TFDS data_dir.")
    parser.add_argument("--tfds_manual_dir", help="Source files to prepare a TFDS dataset from.")
    args = parser.parse_args(argv)
    bad = verify(args.dataset, args.split or ["train", "test"], args.data_dir, args.tfds_manual_dir)
    for split, examples in bad.items():
        for name, reason in examples:
            print(f"bad: {name}: {reason}")
    return 1 if any(bad.values()) else 0


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
