"""Fixture modules of the tests (agents and launcher settings); not part of the package."""
