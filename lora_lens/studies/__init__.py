"""Studies built on the lens: distil an adapter's change back into data (``distill``), the iterative loop
(``curriculum``) and the cross-family comparison (``compare``)."""
