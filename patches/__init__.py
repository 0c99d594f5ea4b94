"""Re-appliable hang hardening for a user's upstream sd-scripts checkout (see patches/README.md)."""
