"""Package data: embedded models (assets/models/<name>/) and other shipped files."""
