"""Small shared helpers (mask encoding, atomic file writes). Reuse these; do not re-implement."""
