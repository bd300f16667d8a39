"""Ray Tune studies over a pipeline's fields, each trial a whole curriculum."""
