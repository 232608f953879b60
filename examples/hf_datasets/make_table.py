"""Write scikit-learn's bundled 8x8 digits as a table on disk, the way a dataset usually arrives:
one row per image, a column of 64 pixel values and a column of labels (plus an id).

    python make_table.py --output digits.parquet            # or .jsonl, .arrow
    python make_table.py --output digits_hf --save-to-disk  # a datasets save_to_disk folder
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_table(output: Path, save_to_disk: bool = False) -> int:
    import datasets
    from sklearn.datasets import load_digits

    datasets.disable_progress_bars()
    x, y = load_digits(return_X_y=True)
    table = datasets.Dataset.from_dict(
        {"id": list(range(len(y))), "pixels": x.astype("float32").tolist(), "digit": y.tolist()}
    )
    if save_to_disk:
        table.save_to_disk(str(output))
    elif output.suffix == ".parquet":
        table.to_parquet(str(output))
    elif output.suffix in (".json", ".jsonl"):
        table.to_json(str(output))
    elif output.suffix == ".arrow":
        table.with_format("arrow").save_to_disk(str(output.with_suffix("")))
        next(output.with_suffix("").glob("*.arrow")).rename(output)
    else:
        raise SystemExit(f"--output {output}: use .parquet, .jsonl or .arrow (or --save-to-disk)")
    return len(table)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--save-to-disk", action="store_true")
    args = p.parse_args()
    print(f"{make_table(Path(args.output), args.save_to_disk)} rows -> {args.output}")
