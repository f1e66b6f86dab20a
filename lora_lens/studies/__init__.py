"""Studies built on the lens: distil an adapter's change back into data (``distill``, with its contrastive
``generation``), the iterative loop (``curriculum``) and the cross-family comparison (``compare``, whose claims over
seeds, intervals and verdicts are ``patterns``)."""

__all__ = ["compare", "curriculum", "distill", "generation", "patterns"]
