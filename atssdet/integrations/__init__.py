"""Adapters that plug atssdet into other libraries (optional dependencies, imported on use)."""
