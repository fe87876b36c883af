"""Warm worker pools (and, later, the local service built on them): design.md section 5."""
