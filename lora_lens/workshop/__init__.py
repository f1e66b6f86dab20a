"""The notebook series: the runner and its report, parameter presets, widgets, exercise checks and figures."""

__all__: list[str] = []
