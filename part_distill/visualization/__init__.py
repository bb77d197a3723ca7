"""part_distill.visualization: saved prediction records and purity collages (paper Fig 5)."""
from .records import (  # noqa: F401
    PREDICTIONS_FORMAT, load_prediction_records, prediction_record, records_from_mined_shard,
    records_from_part_dataset, save_prediction_records, validate_records,
)
from .collages import make_collages, render_tile, draw_collage  # noqa: F401
