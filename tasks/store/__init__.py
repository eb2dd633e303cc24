"""The store: the only code that moves bytes (storage) and the only code that builds keys and versions (lake)."""
