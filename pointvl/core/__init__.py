"""Contracts and I/O shared by every layer: atomic files, errors, strict configs, geometry, the record, the
model-output writer. Imports no other package of pointvl (``docs/design.md#layers``)."""
