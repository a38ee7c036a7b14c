"""What the test ClickHouse's engine itself sustains for the agent's rows: the rows the agent
just wrote (in DATA, with the front stopped) are exported as RowBinary and inserted again,
in-process, without HTTP, Python request handling or the agent. Used by `cargo xtask bench`
to show how close the agent's rate is to the engine's own; prints
`rows_per_second rows seconds` (median of three inserts).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import chdb.session


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--database", default="credwatch")
    ap.add_argument("--rows", type=int, default=300000)
    args = ap.parse_args()
    s = chdb.session.Session(args.data)
    db = args.database
    structure = ", ".join(
        f"{row[0]} {row[1]}"
        for row in (
            line.split("\t")
            for line in s.query(f"DESCRIBE TABLE {db}.events", "TabSeparated")
            .bytes()
            .decode()
            .splitlines()
        )
    )
    # TabSeparated output already escapes quotes (`DateTime64(9, \'UTC\')`), which is what
    # the structure needs inside a quoted SQL string.
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = os.path.join(tmp, "rows.bin")
        data = s.query(
            f"SELECT * FROM {db}.events LIMIT {args.rows} FORMAT RowBinary"
        ).bytes()
        with open(rows_file, "wb") as f:
            f.write(data)
        rows = int(
            s.query(
                f"SELECT count() FROM file('{rows_file}', 'RowBinary', '{structure}')",
                "TabSeparated",
            ).bytes()
        )
        if rows == 0:
            sys.exit(f"ceiling: no rows in {db}.events")
        times = []
        for _ in range(3):
            s.query(f"DROP TABLE IF EXISTS {db}.events_ceiling")
            s.query(f"CREATE TABLE {db}.events_ceiling AS {db}.events")
            t = time.monotonic()
            s.query(
                f"INSERT INTO {db}.events_ceiling SELECT * FROM "
                f"file('{rows_file}', 'RowBinary', '{structure}')"
            )
            times.append(time.monotonic() - t)
        s.query(f"DROP TABLE IF EXISTS {db}.events_ceiling")
    secs = statistics.median(times)
    print(f"{rows / secs:.0f} {rows} {secs:.3f}")


if __name__ == "__main__":
    main()
