"""The privacy ledger as a float64 table, the form it is saved in with the weights.

`write` turns a ledger's segments into a `[rows, F]` array (one column per
`Segment` field, unused rows 0) and `read` turns such an array back into
segments; `tf_dpfair.privacy.ledger.Ledger.to_table` and `from_table` use
them, after compacting a ledger too long for the table. Ids and counts stay
below 2**53, so float64 holds them exactly. No TensorFlow here.
"""

import numpy as np

from tf_dpfair.privacy.segment import PASSES
from tf_dpfair.privacy.segment import POISSON
from tf_dpfair.privacy.segment import SAMPLINGS
from tf_dpfair.privacy.segment import SOURCES
from tf_dpfair.privacy.segment import Segment

# Rows of the saved table; compaction (conservative) beyond that.
TABLE_ROWS = 128
FIELDS = ("segment_id", "sampling", "source", "noise_multiplier",
          "sampling_probability", "updates_per_pass", "pass_offset",
          "updates", "first_noise_index", "noise_key", "overflow_probability",
          "num_examples", "row_limit", "stated_poisson")
FORMAT_VERSION = 1.0


def write(segments, root, rows=TABLE_ROWS):
    """The segments as a float64 `[rows, len(FIELDS)]` array (unused rows are 0).

    Row 0 holds the ledger's `root` id in its first column and the format
    version in its second; segments follow, one a row. No segment: all
    zeros, as a new model's.

    Args:
      segments: at most `rows - 1` `Segment`s.
      root: the ledger's id.
      rows: rows of the table.

    Returns:
      A numpy float64 array.
    """
    table = np.zeros((rows, len(FIELDS)), np.float64)
    if not segments:
        return table  # nothing applied: all zeros, as a new model's
    table[0, 0], table[0, 1] = root, FORMAT_VERSION
    for i, s in enumerate(segments, start=1):
        table[i] = [
            s.segment_id, SAMPLINGS.index(s.sampling) + 1,
            SOURCES.index(s.source), s.noise_multiplier,
            s.sampling_probability or 0.0, s.updates_per_pass or 0,
            s.pass_offset, s.updates, s.first_noise_index, s.noise_key,
            s.overflow_probability,
            -1 if s.num_examples is None else s.num_examples,
            -1 if s.row_limit is None else s.row_limit,
            float(s.stated_poisson)]
    return table


def read(table):
    """The segments and root id of a table written by `write`.

    Returns:
      `(segments, root)`: a list of `Segment`s, and the root id (None for
      an all-zero table).

    Raises:
      ValueError: the array is not a ledger table.
    """
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or table.shape[1] != len(FIELDS) or table.shape[0] < 1:
        raise ValueError(f"Not a ledger table: shape {table.shape}.")
    if not table.any():
        return [], None
    if table[0, 1] != FORMAT_VERSION:
        raise ValueError(f"Unknown ledger table format {table[0, 1]!r}.")
    segments = []
    for row in table[1:]:
        if row[0] == 0:
            continue
        sampling = SAMPLINGS[int(row[1]) - 1]
        segments.append(Segment(
            segment_id=int(row[0]), sampling=sampling,
            source=SOURCES[int(row[2])], noise_multiplier=float(row[3]),
            sampling_probability=float(row[4]) if sampling == POISSON else None,
            updates_per_pass=int(row[5]) if sampling == PASSES else None,
            pass_offset=int(row[6]), updates=int(row[7]),
            first_noise_index=int(row[8]), noise_key=int(row[9]),
            overflow_probability=float(row[10]),
            num_examples=None if row[11] < 0 else int(row[11]),
            row_limit=None if row[12] < 0 else int(row[12]),
            stated_poisson=bool(row[13])))
    return segments, int(table[0, 0])
