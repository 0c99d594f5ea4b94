"""One module per hardening patch, applied in the order of patches/series."""
