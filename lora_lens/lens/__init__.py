"""What changed and why: weight space (``delta``), behaviour (``diff``), attribution of the change
(``attribution``) and the ``lora-lens inspect`` report (``inspect_adapter``)."""
