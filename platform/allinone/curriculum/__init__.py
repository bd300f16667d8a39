"""The whole run: stage plans, run state, fitting a stage, scoring it, and the curriculum."""
