"""part_distill.rating: the local purity-rating web app (paper Sec 5.2 / 5.4, Fig 4)."""
from .db import MAX_RATING, MIN_RATING, RatingDB, next_unrated, parse_rating, validate_rater  # noqa: F401
from .curve import RATING_LEVELS, collage_ratings, plot_precision_curve, precision_curve  # noqa: F401
from .server import Method, RatingApp, load_method, make_server, rating_queue  # noqa: F401
