"""Contracts and I/O shared by every layer: atomic files, errors, strict configs, geometry, the record."""
