"""Repository-root conftest: makes `kvfactory` importable from a plain checkout."""
