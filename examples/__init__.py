"""Examples of user code plugged into rlatent (importable from the repository root)."""
