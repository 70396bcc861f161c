"""Errors of the LoRA package, importable without torch (the serve replica process never loads torch)."""


class AdapterError(ValueError):
    """A LoRA adapter directory that cannot be served (message names the problem)."""
