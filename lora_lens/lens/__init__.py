"""What changed and why: weight space (``delta``), behaviour (``diff``), attribution of the change
(``attribution``) and the ``lora-lens inspect`` report (``inspect_adapter`` builds it, ``inspect_report`` renders
it)."""

__all__ = ["attribution", "delta", "diff", "inspect_adapter", "inspect_report"]
